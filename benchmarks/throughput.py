"""Training and sampling throughput (images/s) and model-FLOPs utilisation (MFU) of the project's
models, through the project's own step code, on the device it runs on (CUDA if present, else CPU).

Rows: (a) ViT-B/16 224 px supervised fine-tuning step, (b) Semi-ViT step (mu = 5, EMA teacher on
the weak views, student on labeled + strong views, pseudo mixup on), (c) MAE ViT-B/16 pre-training
step, (d) DiT-B/2 training step on 32x32x4 latents, (e) DiT-B/2 guided sampling (DPM-Solver++, 25
steps) with our loop and with diffusers' DiTPipeline on the same weights, (f) pseudo mixup, batched
against a per-sample loop, at 224 px and 28 px (one thread on the CPU), (g) the training loop's hot
path through the project's Trainer, one change at a time (benchmarks/hot_path.py: the non-finite
flag read every step against every 50 steps, AdamW for-loop / foreach / fused, torch.compile, and
on CUDA TF32 and pinned memory with non_blocking copies; compile only on CUDA here).

GPU commands (TF32 on for the float32 parts with --tf32):

    python -m benchmarks.throughput --rows a,b,c,d,g --tf32 --out benchmarks/results/throughput/throughput.json
    python -m benchmarks.hot_path --model vit_base_patch16_224 --image-size 224 --batch-size 128 --steps 30

``python -m semivit plan`` reads benchmarks/results/throughput/throughput.json for its time estimates.

FLOPs are those of one counted step (``torch.utils.flop_counter.FlopCounterMode``: matmuls,
convolutions, attention; forward and backward); MFU divides FLOPs/s by the device's dense peak for
the precision used (table below, or ``--peak-tflops``). Inputs are random tensors already on the
device: the numbers are the model step, not the data loader.

    python -m benchmarks.throughput                      # every row, device defaults
    python -m benchmarks.throughput --rows a,b --batch-size 128 --compile --out vit.json
    python -m benchmarks.throughput --small              # tiny models, < 1 min on a CPU (tests)
    python -m benchmarks.throughput --threads 1          # a shared CPU: one thread measures steadily

The result goes to benchmarks/results/throughput/throughput.json (throughput_small.json with
--small) unless --out names another file, with its provenance (command, commit, machine).

Row (f) runs each size in a fresh process on the CPU (see ``mixup_row_in_fresh_process``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.record import ROOT, result_dir, write_result
from semivit.stages.ssl import prob_pseudo_mixup, smooth_one_hot

ROWS = "abcdefg"
MU = 5  # unlabeled images per labeled one in the Semi-ViT step
SAMPLING_STEPS = 25
GUIDANCE = 4.0  # any w other than 0 and 1 runs the doubled (conditional + unconditional) batch
DIT_CLASSES = 1000  # ImageNet's; DiTPipeline hard-codes 1000 as the null label

# Dense (no sparsity) peak TFLOP/s per precision; bf16/fp16 are tensor-core peaks with fp32
# accumulation, fp32 the non-tensor-core peak (this benchmark leaves TF32 off). Patterns are tried
# in order, so the more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    (r"H100.*NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM
    (r"H200.*NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
]

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


# --------------------------------------------------------------------------------------------
# Device, peak and FLOP counting
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_peak_tflops(name: str, precision: str) -> float | None:
    """The dense peak of a known device at ``precision``, or None."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """A FlopCounterMode that also counts the CPU flash-attention kernel, which PyTorch's table
    lists only for its CUDA kernels (the CPU attention would otherwise count as 0 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def count_step(step: Callable[[], None]) -> tuple[float, list[str]]:
    """FLOPs of one call of ``step`` and the attention kernels it ran (SDPA or not)."""
    with flop_counter() as counter:
        step()
    ops = [str(op) for op in counter.get_flop_counts()["Global"]]
    return float(counter.get_total_flops()), sorted(op for op in ops if "attention" in op or "bmm" in op)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Workloads: one training or sampling step of the project's code, on random device tensors
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    row: str
    name: str
    images: int  # images per step (for the Semi-ViT step: the student's labeled + unlabeled images)
    step: Callable[[], None]
    modules: list = field(default_factory=list)  # compiled in place with --compile
    info: dict = field(default_factory=dict)


@dataclass
class Settings:
    device: torch.device
    precision: str
    small: bool
    batch: dict  # row -> batch size
    accelerator: object = None


def adamw_flags(opt) -> dict:
    """What the optimizer really runs: fused / foreach as its param groups record them."""
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
    group = inner.param_groups[0]
    return {"optimizer": type(inner).__name__, "fused": bool(group.get("fused")), "foreach": group.get("foreach")}


def vit_config(small: bool):
    from semivit.config.schema import ModelConfig

    name = "vit_micro_patch4" if small else "vit_base_patch16_224"
    return ModelConfig(name=name, drop_path=0.1, global_pool="avg", init="none"), (32 if small else 224)


def uses_sdpa_vit(model) -> bool:
    return all(getattr(block.attn, "fused_attn", False) for block in model.blocks)


def ema_update(acc, model, ema, state) -> None:
    """The EMA (teacher) follows every optimizer step, as ``Trainer.fit``'s ``on_update`` does."""
    if acc.sync_gradients:
        ema.update(acc.unwrap_model(model), step=state.step)
        state.step += 1


def _classifier_parts(s: Settings, num_classes: int, ema_warmup: bool):
    """Model, EMA, layer-decay AdamW and schedule exactly as the classifier stages build them."""
    from semivit.models.classifier import create_classifier
    from semivit.runtime.accelerator import TrainState, warmup_cosine
    from semivit.stages.common import make_ema, make_optimizer

    mcfg, size = vit_config(s.small)
    model = create_classifier(mcfg, num_classes, size, 3)
    ema = make_ema(model, 0.999, warmup=ema_warmup)
    opt = make_optimizer(model, 5e-4, 0.05, 0.75)
    sched = warmup_cosine(opt, 10, 10_000, 0.01)
    model, opt, sched = s.accelerator.prepare(model, opt, sched)
    ema.to(s.device)
    return model, ema, opt, sched, TrainState(), size


def vit_finetune(s: Settings) -> Workload:
    """(a) the fine-tuning stage's step: forward + loss under autocast, backward, AdamW with
    layer decay, schedule, EMA."""
    from semivit.runtime.loop import optimizer_update

    acc = s.accelerator
    k = 10 if s.small else 1000
    model, ema, opt, sched, state, size = _classifier_parts(s, k, ema_warmup=True)  # as finetune
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    b = s.batch["a"]
    x = torch.randn(b, 3, size, size, device=s.device)
    y = torch.randint(0, k, (b,), device=s.device)

    def step():
        with acc.accumulate(model):
            with acc.autocast():
                loss = criterion(model(x), y)
            acc.backward(loss)
            optimizer_update(acc, model, opt, sched, 0.0)
        ema_update(acc, model, ema, state)

    info = {"sdpa": uses_sdpa_vit(acc.unwrap_model(model)), **adamw_flags(opt)}
    return Workload("a", "vit_finetune", b, step, [acc.unwrap_model(model), ema.module], info)


def semivit_step(s: Settings) -> Workload:
    """(b) ``semivit.stages.semi.train_step`` with mu = 5: teacher (EMA) on the weak views, pseudo mixup of
    the strong views, student forward on labeled + mixed strong views; backward, AdamW, EMA."""
    from semivit.config.schema import SemiConfig
    from semivit.runtime.loop import optimizer_update
    from semivit.stages.semi import train_step

    acc = s.accelerator
    k = 10 if s.small else 1000
    total = s.batch["b"]
    n_l = total // (1 + MU)
    if n_l < 1:
        raise SystemExit(f"the Semi-ViT row needs a batch of at least {1 + MU} (1 labeled + {MU} unlabeled)")
    sc = SemiConfig(batch_size=n_l, mu=MU, pseudo_mixup=True, tau=0.7, label_smoothing=0.1)
    model, ema, opt, sched, state, size = _classifier_parts(s, k, ema_warmup=False)  # as semi
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=sc.label_smoothing)
    x_l = torch.randn(n_l, 3, size, size, device=s.device)
    y_l = torch.randint(0, k, (n_l,), device=s.device)
    weak = torch.randn(MU * n_l, 3, size, size, device=s.device)
    strong = torch.randn(MU * n_l, 3, size, size, device=s.device)

    def step():
        with acc.accumulate(model):
            losses, _, _ = train_step(model, ema, acc, criterion, None, sc, k, x_l, y_l, weak, strong)
            acc.backward(losses[0])
            optimizer_update(acc, model, opt, sched, sc.clip_grad)
        ema_update(acc, model, ema, state)

    info = {"labeled": n_l, "unlabeled": MU * n_l, "sdpa": uses_sdpa_vit(acc.unwrap_model(model)), **adamw_flags(opt)}
    return Workload("b", "semivit_step", n_l * (1 + MU), step, [acc.unwrap_model(model), ema.module], info)


def mae_pretrain(s: Settings) -> Workload:
    """(c) the MAE stage's step (75 % masking; the paper's 512-wide, 8-block decoder at full size)."""
    from timm.optim import create_optimizer_v2

    from semivit.config.schema import PretrainConfig
    from semivit.models.mae import create_mae
    from semivit.runtime.accelerator import warmup_cosine

    acc = s.accelerator
    mcfg, size = vit_config(s.small)
    if s.small:
        pcfg = PretrainConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    else:
        pcfg = PretrainConfig(decoder_dim=512, decoder_depth=8, decoder_heads=16)
    mae = create_mae(mcfg, pcfg, size, 3)
    fused = {"fused": True} if s.device.type == "cuda" else {}
    opt = create_optimizer_v2(mae, "adamw", lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), **fused)
    sched = warmup_cosine(opt, 10, 10_000, 0.01)
    mae, opt, sched = acc.prepare(mae, opt, sched)
    b = s.batch["c"]
    x = torch.randn(b, 3, size, size, device=s.device)

    def step():
        with acc.accumulate(mae):
            with acc.autocast():
                loss, _, _ = mae(x)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    raw = acc.unwrap_model(mae)
    info = {"sdpa": uses_sdpa_vit(raw.encoder), **adamw_flags(opt)}
    return Workload("c", "mae_pretrain", b, step, [raw], info)


def dit_config(small: bool):
    from semivit.config.schema import DiffusionConfig

    if small:
        return DiffusionConfig(model="dit", patch_size=2, hidden_size=64, depth=2, num_heads=2), 8
    return DiffusionConfig(model="dit", patch_size=2, hidden_size=768, depth=12, num_heads=12), 32  # DiT-B/2


def uses_sdpa_diffusers(model) -> bool:
    """diffusers' attention modules run F.scaled_dot_product_attention through AttnProcessor2_0."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    return bool(processors) and all(isinstance(p, AttnProcessor2_0) for p in processors)


def dit_train(s: Settings) -> Workload:
    """(d) train-diffusion's step on latents (already encoded: the VAE is not part of it): label
    drop, noising, forward under autocast, MSE, backward, clip, AdamW, schedule, EMA."""
    import torch.nn.functional as F
    from diffusers.training_utils import EMAModel

    from dpt.diffusion.model import build_denoiser, denoiser_forward, drop_labels
    from dpt.diffusion.sampling import make_noise_scheduler, training_target
    from semivit.runtime.accelerator import warmup_cosine

    acc = s.accelerator
    dcfg, size = dit_config(s.small)
    model = build_denoiser(dcfg, DIT_CLASSES, 4, size)
    noise_scheduler = make_noise_scheduler(dcfg, latent=True)
    ema = EMAModel(model.parameters(), decay=dcfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    # train_diffusion builds a default AdamW; the fused kernel is what it should ask for on CUDA
    opt = torch.optim.AdamW(model.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay, fused=s.device.type == "cuda")
    model, opt = acc.prepare(model, opt)
    sched = warmup_cosine(opt, 10, 10_000, 0.1)
    ema.to(s.device)
    raw = acc.unwrap_model(model)
    b = s.batch["d"]
    x0 = torch.randn(b, 4, size, size, device=s.device)
    labels = torch.randint(0, DIT_CLASSES, (b,), device=s.device)
    steps_total = noise_scheduler.config.num_train_timesteps

    def step():
        with acc.accumulate(model):
            y = drop_labels(labels, DIT_CLASSES, dcfg.p_uncond)
            noise = torch.randn_like(x0)
            t = torch.randint(0, steps_total, (b,), device=s.device)
            xt = noise_scheduler.add_noise(x0, noise, t)
            with acc.autocast():
                pred = denoiser_forward(model, xt, t, y)
            loss = F.mse_loss(pred.float(), training_target(noise_scheduler, x0, noise, t).float())
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), dcfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        ema.step(raw.parameters())

    info = {"latent": [4, size, size], "sdpa": uses_sdpa_diffusers(raw), **adamw_flags(opt)}
    return Workload("d", "dit_train", b, step, [raw], info)


def _sampling_parts(s: Settings):
    from dpt.diffusion.model import build_denoiser
    from dpt.diffusion.sampling import make_noise_scheduler

    dcfg, size = dit_config(s.small)
    model = build_denoiser(dcfg, DIT_CLASSES, 4, size).to(s.device).eval()
    b = s.batch["e"]
    noise = torch.randn(b, 4, size, size, device=s.device)
    labels = torch.randint(0, DIT_CLASSES, (b,), device=s.device)
    return model, make_noise_scheduler(dcfg, latent=True), noise, labels


def dit_sample(s: Settings, parts) -> Workload:
    """(e) ``dpt.diffusion.sample``: DPM-Solver++, 25 steps, guidance w = 4 (doubled batch)."""
    from dpt.diffusion.sampling import make_sampler, sample

    model, noise_scheduler, noise, labels = parts
    sampler = make_sampler(noise_scheduler.config, "dpmsolver++")

    def step():
        with s.accelerator.autocast():
            sample(model, sampler, noise, labels, DIT_CLASSES, GUIDANCE, SAMPLING_STEPS)

    info = {"steps": SAMPLING_STEPS, "guidance": GUIDANCE, "sdpa": uses_sdpa_diffusers(model)}
    return Workload("e", "dit_sample", noise.shape[0], step, [model], info)


def tiny_vae(device):
    """A one-level AutoencoderKL (no down-sampling): DiTPipeline always decodes, and this decoder's
    cost is negligible next to 25 DiT-B/2 passes, so the comparison is the sampling loop."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, layers_per_block=1,
    )
    return vae.to(device).eval()


def dit_pipeline(s: Settings, parts) -> Workload:
    """(e') diffusers' DiTPipeline loop on the same weights, scheduler kind, steps and guidance."""
    from diffusers import DiTPipeline

    from dpt.diffusion.sampling import make_sampler

    model, noise_scheduler, noise, labels = parts
    pipe = DiTPipeline(transformer=model, vae=tiny_vae(s.device), scheduler=make_sampler(noise_scheduler.config, "dpmsolver++"))
    pipe.set_progress_bar_config(disable=True)
    class_ids = labels.tolist()

    def step():
        with torch.no_grad(), s.accelerator.autocast():
            pipe(class_labels=class_ids, guidance_scale=GUIDANCE, num_inference_steps=SAMPLING_STEPS, output_type="pt")

    return Workload("e", "ditpipeline_sample", noise.shape[0], step, [model], {"steps": SAMPLING_STEPS, "guidance": GUIDANCE})


# --------------------------------------------------------------------------------------------
# Pseudo mixup: batched against Semi-ViT's per-sample loop
# --------------------------------------------------------------------------------------------


def per_sample_pseudo_mixup(images, conf, pseudo, num_classes, tau, smoothing=0.1, cutmix_prob=0.5, perm=None, generator=None):
    """Semi-ViT's probabilistic pseudo mixup as its own code does it, one sample at a time: a
    partner copy of the batch, then per sample either the partner's box pasted in (CutMix, lam
    from the clipped box) or ``x_i * lam + x_j * (1 - lam)`` (Mixup); targets mixed batched.
    Draws the same random numbers as ``prob_pseudo_mixup`` (randperm, rand, randint, randint), so
    both can be compared on one seed. The caller's batch is left as it was (a copy is mixed)."""
    n, _, h, w = images.shape
    device = images.device
    if perm is None:
        perm = torch.randperm(n, generator=generator, device=device)
    use_cut = (torch.rand(n, generator=generator, device=device) < cutmix_prob).tolist()
    cy = torch.randint(0, h, (n,), generator=generator, device=device).tolist()
    cx = torch.randint(0, w, (n,), generator=generator, device=device).tolist()
    conf = conf.float()
    conf_p = conf[perm]
    lam = (conf / (conf + conf_p).clamp_min(1e-12)).tolist()
    mixed = images.clone()
    partners = images[perm]
    for i in range(n):
        if use_cut[i]:
            side = math.sqrt(min(max(1.0 - lam[i], 0.0), 1.0))
            cut_h, cut_w = int(h * side), int(w * side)
            y1, y2 = min(max(cy[i] - cut_h // 2, 0), h), min(max(cy[i] + cut_h // 2, 0), h)
            x1, x2 = min(max(cx[i] - cut_w // 2, 0), w), min(max(cx[i] + cut_w // 2, 0), w)
            mixed[i, :, y1:y2, x1:x2] = partners[i, :, y1:y2, x1:x2]
            lam[i] = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        else:
            mixed[i] = mixed[i] * lam[i] + partners[i] * (1.0 - lam[i])
    lam = torch.tensor(lam, device=device).view(-1, 1)
    onehot = smooth_one_hot(pseudo, num_classes, smoothing)
    target = lam * onehot + (1.0 - lam) * onehot[perm]
    return {"images": mixed, "target": target, "mask": torch.maximum(conf, conf_p) >= tau}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of one call. With one intra-op thread on the
    CPU the work runs on the calling thread, so its CPU time leaves out the time other processes
    of a shared machine held the core (page faults and memory stalls still count)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.thread_time() - cpu


def mixup_row(device: torch.device, shape: tuple[int, int, int, int], repeats: int) -> dict:
    """Best times of the batched and the per-sample pseudo mixup on one batch over ``repeats``
    turns of 3 calls each, the two taking turns so that a busy moment of a shared machine hits
    both; and whether they agree."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=g).to(device)
    conf = (torch.rand(n, generator=g) * 0.5 + 0.5).to(device)
    pseudo = torch.randint(0, 10, (n,), generator=g).to(device)
    args = (images, conf, pseudo, 10, 0.7, 0.1, 0.5)

    def seeded(fn):
        return fn(*args, generator=torch.Generator(device=device).manual_seed(1))

    a, b = seeded(prob_pseudo_mixup), seeded(per_sample_pseudo_mixup)
    exact = bool(torch.equal(a["images"], b["images"]))
    target_err = float((a["target"] - b["target"]).abs().max())
    batched, loop = [math.inf, math.inf], [math.inf, math.inf]  # wall, thread CPU
    for _ in range(repeats):
        # a few calls in a row per turn, as timeit does: a call's temporaries then come from a
        # heap the previous call of the same code left, instead of one the other code reshaped
        for _ in range(3):
            batched = [min(x) for x in zip(batched, timed(lambda: prob_pseudo_mixup(*args), device), strict=True)]
        for _ in range(3):
            loop = [min(x) for x in zip(loop, timed(lambda: per_sample_pseudo_mixup(*args), device), strict=True)]
    row = {
        "row": "f",
        "name": f"pseudo_mixup_{h}px",
        "batch": n,
        "shape": list(shape),
        "images_per_s": n / batched[0],
        "step_ms": 1e3 * batched[0],
        "loop_ms": 1e3 * loop[0],
        "speedup_vs_loop": loop[0] / batched[0],
        "images_equal_to_loop": exact,
        "target_max_abs_diff": target_err,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cpu" and torch.get_num_threads() == 1:
        row.update(cpu_ms=1e3 * batched[1], loop_cpu_ms=1e3 * loop[1], cpu_speedup_vs_loop=loop[1] / batched[1])
    return row


MIXUP_SHAPES = ((64, 3, 224, 224), (320, 1, 28, 28))  # ImageNet's 224 px, MNIST's 28 px


def mixup_row_in_fresh_process(shape: tuple[int, ...], repeats: int) -> dict:
    """``mixup_row`` on the CPU, one thread, in a new interpreter. glibc returns freed heap
    memory to the system once enough of it piles up, at a threshold that earlier allocations set
    (the 224 px row's 600 KB rows set a low one); a process that has run other rows would make
    every 1 MB temporary at 28 px fault its pages in again, for both implementations alike."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--mixup-child", ",".join(map(str, shape)),
           "--mixup-repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"pseudo-mixup timing process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mixup_rows(device: torch.device, repeats: int) -> list[dict]:
    """(f) at 224 px and 28 px; on the CPU each in a fresh process pinned to one thread, so the
    ratio is the algorithm's and not the thread count's or the heap's history."""
    if device.type == "cpu":
        return [mixup_row_in_fresh_process(shape, repeats) for shape in MIXUP_SHAPES]
    return [mixup_row(device, shape, repeats) for shape in MIXUP_SHAPES]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure(w: Workload, s: Settings, steps: int, warmup: int, compile_: bool, peak: float | None) -> dict:
    """Count one step's FLOPs (eager), optionally compile, warm up, then time ``steps`` steps."""
    return measure_together([w], s, steps, warmup, compile_, peak)[0]


def measure_together(ws: list[Workload], s: Settings, steps: int, warmup: int, compile_: bool, peak) -> list[dict]:
    """``measure`` for workloads compared with one another: their steps take turns, so that a busy
    moment of a shared machine slows all of them rather than one."""
    counted = [count_step(w.step) for w in ws]
    if compile_:
        for module in {id(m): m for w in ws for m in w.modules}.values():  # shared modules once
            module.compile()
    for _ in range(warmup):
        for w in ws:
            w.step()
    seconds = [0.0] * len(ws)
    for _ in range(steps):
        for i, w in enumerate(ws):
            synchronize(s.device)
            start = time.perf_counter()
            w.step()
            synchronize(s.device)
            seconds[i] += (time.perf_counter() - start) / steps
    return [_row(w, sec, flops, ops, steps, peak) for w, sec, (flops, ops) in zip(ws, seconds, counted, strict=True)]


def _row(w: Workload, seconds: float, flops: float, attention_ops: list[str], steps: int, peak) -> dict:
    achieved = flops / seconds / 1e12
    return {
        "row": w.row,
        "name": w.name,
        "batch": w.images,
        "images_per_s": w.images / seconds,
        "step_ms": 1e3 * seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "attention_ops": attention_ops,
        "steps": steps,
        **w.info,
    }


def hot_path_rows(device: torch.device, small: bool) -> list[dict]:
    """Row g: the Trainer's hot path one change at a time (benchmarks/hot_path.py), small on a CPU."""
    from benchmarks.hot_path import CUDA_ONLY, VARIANTS, hot_path_args, run_variant

    cuda = device.type == "cuda"
    args = hot_path_args(small or not cuda)
    rows = []
    for name in VARIANTS:
        if (name in CUDA_ONLY or name == "compile") and not cuda:
            continue
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            r = run_variant(name, args, Path(tmp))
        rows.append({"row": "g", "name": f"loop_{name}", "batch": args.batch_size, "images_per_s": r["images_per_s"],
                     "step_ms": r["step_ms"]})
    return rows


def compare_semi_to_finetune(results: list[dict]) -> None:
    """Semi-ViT's time per student image over the supervised step's (target: <= 1.4 on a GPU)."""
    by_name = {r["name"]: r for r in results}
    if "vit_finetune" in by_name and "semivit_step" in by_name:
        a, b = by_name["vit_finetune"], by_name["semivit_step"]
        b["time_per_image_vs_finetune"] = a["images_per_s"] / b["images_per_s"]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_batches(device: torch.device, small: bool) -> dict:
    if small:
        return {"a": 12, "b": 12, "c": 8, "d": 8, "e": 4}
    if device.type == "cuda":
        return {"a": 192, "b": 192, "c": 256, "d": 256, "e": 256}
    return {"a": 6, "b": 6, "c": 8, "d": 4, "e": 1}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS, help="letters of the rows to run, e.g. a,b,f (default: all)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tf32", action="store_true", help="CUDA: TF32 tensor cores for float32 matmuls (the training default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (FLOPs are counted eagerly first)")
    p.add_argument("--batch-size", type=int, default=0, help="images per step for every row (Semi-ViT: labeled + unlabeled)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per row (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps after the FLOP-counting one (default: 5 on CUDA, 0 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for --precision (needed for MFU on a CPU)")
    p.add_argument("--mixup-repeats", type=int, default=15, help="turns of 3 pseudo-mixup calls each (best call is kept)")
    p.add_argument("--small", action="store_true", help="tiny models and sizes: well under a minute on a CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 on a shared CPU")
    p.add_argument("--out", default="", help="JSON file to write (default: benchmarks/results/throughput/"
                   "throughput.json, or throughput_small.json with --small)")
    p.add_argument("--mixup-child", default="", help=argparse.SUPPRESS)  # N,C,H,W: one row f, JSON to stdout
    return p.parse_args(argv)


def print_table(result: dict) -> None:
    print(
        f"device: {result['device']} ({result['device_type']}), torch {result['torch']}, precision {result['precision']}"
        f"{', compiled' if result['compile'] else ''}, peak {result['peak_tflops'] or 'n/a'} TFLOP/s"
    )
    head = f"{'row':3} {'name':22} {'batch':>5} {'images/s':>10} {'step ms':>10} {'TFLOP/step':>11} {'MFU':>7}  notes"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        tflop = f"{r['tflop_per_step']:.4f}" if "tflop_per_step" in r else "-"
        if r["row"] == "f":
            notes = f"loop {r['loop_ms']:.2f} ms, x{r['speedup_vs_loop']:.2f}"
            if "cpu_speedup_vs_loop" in r:
                notes += f" (CPU time {r['cpu_ms']:.2f} vs {r['loop_cpu_ms']:.2f} ms, x{r['cpu_speedup_vs_loop']:.2f})"
            notes += f", equal={r['images_equal_to_loop']}, {r['threads']} thread(s)"
        else:
            notes = ", ".join(f"{k}={r[k]}" for k in ("sdpa", "fused") if k in r)
            if "time_per_image_vs_finetune" in r:
                notes += f", x{r['time_per_image_vs_finetune']:.2f} the fine-tune time per image"
            if "ours_speedup" in r:
                notes += f", its time / ours x{r['ours_speedup']:.2f}"
        print(f"{r['row']:3} {r['name']:22} {r['batch']:>5} {r['images_per_s']:>10.2f} {r['step_ms']:>10.2f} {tflop:>11} {mfu:>7}  {notes}")


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator

    args = parse_args(argv)
    if args.mixup_child:
        torch.set_num_threads(1)
        shape = tuple(int(v) for v in args.mixup_child.split(","))
        row = mixup_row(torch.device("cpu"), shape, args.mixup_repeats)
        print(json.dumps(row))
        return row
    if args.threads:
        # an intra-op thread team on an oversubscribed CPU waits at every barrier for its slowest
        # (descheduled) member: one thread measures a shared machine far more steadily
        torch.set_num_threads(args.threads)
    rows = list(dict.fromkeys(args.rows.replace(",", "").replace(" ", "")))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; use letters of {ROWS}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        from semivit.runtime.accelerator import enable_tf32

        enable_tf32(args.tf32)
    name = device_name(device)
    peak = args.peak_tflops or (table_peak_tflops(name, precision) if device.type == "cuda" else None)
    batches = default_batches(device, args.small)
    if args.batch_size:
        batches = dict.fromkeys(batches, args.batch_size)
    steps = args.steps or (3 if args.small else 20 if device.type == "cuda" else 2)
    # the FLOP-counting step runs first and untimed; on the CPU that is warm-up enough
    warmup = args.warmup if args.warmup >= 0 else (5 if device.type == "cuda" else 0)
    s = Settings(device, precision, args.small, batches)
    s.accelerator = Accelerator(mixed_precision=MIXED_PRECISION[precision], cpu=device.type == "cpu")
    torch.manual_seed(0)

    results = []
    builders = {"a": vit_finetune, "b": semivit_step, "c": mae_pretrain, "d": dit_train}
    done = 0
    for row in rows:
        if row in builders:
            results.append(measure(builders[row](s), s, steps, warmup, args.compile, peak))
        elif row == "e":
            parts = _sampling_parts(s)
            # one sampling call is 25 model passes: fewer calls suffice
            calls, warm = max(1, steps // 2), min(warmup, 2)
            workloads = [dit_sample(s, parts), dit_pipeline(s, parts)]  # one model: compiled for both
            ours, theirs = measure_together(workloads, s, calls, warm, args.compile, peak)
            theirs["ours_speedup"] = theirs["step_ms"] / ours["step_ms"]
            results += [ours, theirs]
        elif row == "f":
            results += mixup_rows(device, args.mixup_repeats)
        elif row == "g":
            results += hot_path_rows(device, args.small)
        free(device)
        for r in results[done:]:
            print(f"row {r['row']} {r['name']}: {r['images_per_s']:.2f} images/s, {r['step_ms']:.1f} ms/step", flush=True)
        done = len(results)

    compare_semi_to_finetune(results)
    result = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "precision": precision,
        "compile": args.compile,
        "small": args.small,
        "threads": torch.get_num_threads(),
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else ("table" if peak else None),
        "rows": results,
    }
    out = Path(args.out) if args.out else result_dir(__name__) / ("throughput_small.json" if args.small else "throughput.json")
    write_result(out, result, argv=None if argv is None else [__file__, *argv])
    print_table(result)
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
