"""The noise schedule, the training target, classifier-free guidance and the samplers (DDPM, DDIM,
DPM-Solver++), and the per-image noise seeds that make generation independent of batch and rank.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
)

from dpt.diffusion.model import denoiser_forward
from dpt.errors import DPTError
from semivit.config.schema import DiffusionConfig


def guided_prediction(doubled: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``doubled`` holds the conditional outputs in its first half and the unconditional ones in its
    second half (one doubled batch); returns eps_u + w (eps_c - eps_u), over all channels."""
    if doubled.shape[0] % 2:
        raise ValueError("guided_prediction expects an even batch: conditional half, then unconditional half")
    cond, uncond = doubled.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def predict(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_label: int, w: float) -> torch.Tensor:
    """The guided model output. w=0: unconditional only; w=1: conditional only (one pass each);
    otherwise both in one doubled batch."""
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if w == 0:
        return denoiser_forward(model, x, t, torch.full_like(labels, null_label))
    if w == 1:
        return denoiser_forward(model, x, t, labels)
    both = denoiser_forward(
        model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)])
    )
    return guided_prediction(both, w)

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")


def make_noise_scheduler(dcfg: DiffusionConfig, latent: bool) -> DDPMScheduler:
    if dcfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise DPTError(
            f"diffusion.prediction_type must be epsilon, v_prediction or sample (got '{dcfg.prediction_type}')"
        )
    try:
        return DDPMScheduler(
            num_train_timesteps=dcfg.num_train_timesteps,
            beta_schedule=dcfg.beta_schedule,
            prediction_type=dcfg.prediction_type,
            clip_sample=not latent,  # pixels live in [-1, 1]; latents do not
        )
    except NotImplementedError as e:
        raise DPTError(f"diffusion.beta_schedule='{dcfg.beta_schedule}' is not supported: {e}") from e


class ClippedDDIMScheduler(DDIMScheduler):
    """DDIM whose clipped clean-image estimate also gives the noise it carries on (diffusers'
    ``use_clipped_model_output``, GLIDE's and guided-diffusion's rule), on by default. Without it
    diffusers clips the estimate but keeps the noise implied by the unclipped one, so wherever the
    network (or classifier-free guidance) overshoots the pixel range, each step moves x_t away from
    the clipped image: with a clean-image predicting generator and guidance 2, about half of the
    digits came out as another class at 50 steps, four in five at 250."""

    def step(self, *args, **kwargs):
        kwargs.setdefault("use_clipped_model_output", True)
        return super().step(*args, **kwargs)


def make_sampler(train_scheduler_config, sampler: str):
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_scheduler_config)
    if sampler == "ddim":
        return ClippedDDIMScheduler.from_config(train_scheduler_config)
    if sampler in ("dpmsolver++", "sde-dpmsolver++"):
        # In pixel space (clip_sample) the predicted clean image is clipped to [-1, 1], as DDPM and
        # DDIM do: with a cosine schedule alpha_bar(T) ~ 1e-9, so the first x0 estimate amplifies
        # the model's error ~1e4-fold, and an unclipped data-prediction solver turns it into noise.
        # (Dynamic thresholding with sample_max_value=1 is exactly that clip.)
        # sde-dpmsolver++ (Lu et al., 2022, the SDE form) adds fresh noise at every step, as DDPM
        # does: errors of the clean-image estimate made at one step are partly washed out by the
        # next instead of being carried along the deterministic path; the images are then a
        # function of their per-image generators (see sample()).
        pixel = bool(dict(train_scheduler_config).get("clip_sample", False))
        return DPMSolverMultistepScheduler.from_config(
            train_scheduler_config, algorithm_type=sampler, thresholding=pixel, sample_max_value=1.0
        )
    raise DPTError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)} (generate.sampler)")


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma weighting (Hang et al., 2023) of each sample's MSE, for the scheduler's
    prediction target: the loss of each noise level counted as if it were an epsilon loss weighted
    by min(SNR, gamma), so the nearly clean levels (where the fine strokes are decided) are not
    drowned by the easy ones. None (uniform weights) when ``min_snr_gamma`` is 0."""
    if min_snr_gamma <= 0:
        return None
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=min_snr_gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # the clean image: its MSE is the epsilon MSE divided by the SNR


@torch.no_grad()
def sample(
    model,
    scheduler,
    noise: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    guidance_scale: float,
    steps: int,
    generators: list[torch.Generator] | None = None,
    amp_dtype: torch.dtype | None = None,
    guidance_min_t: float = 0.0,
) -> torch.Tensor:
    """Our guided sampling loop over any diffusers scheduler (diffusers' DiTPipeline hard-codes 1000
    classes). ``generators`` (one per image) feed the stochastic samplers, so an image never
    depends on which other images share its batch. ``amp_dtype`` (bf16/fp16) runs the network
    under autocast. ``guidance_min_t`` > 0 guides only the noisier steps (t at least that share of
    the training timesteps) and samples the rest conditionally: the class is decided at high
    noise, while guiding the nearly clean steps amplifies the network's pixel-level errors."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    last_guided = guidance_min_t * scheduler.config.num_train_timesteps
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        w = guidance_scale if guidance_min_t <= 0 or float(t) >= last_guided else 1.0
        # the network may run in reduced precision (amp_dtype); the solver's state stays fp32
        with torch.autocast(noise.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = predict(model, x_in, t.to(noise.device), labels, null_label, w)
        out = out.float()
        x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x


def image_noise(seeds: list[int], shape: tuple, device="cpu") -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise, one CPU generator per image seeded by its own seed (same on every device)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return noise, gens


def image_seed(base_seed: int, class_id: int, index: int) -> int:
    """The seed of image ``index`` of class ``class_id``: a function of these three numbers only."""
    return int(np.random.SeedSequence([int(base_seed), int(class_id), int(index)]).generate_state(1)[0])

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
