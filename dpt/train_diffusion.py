"""Stage 2a: train a class-conditional diffusion model on real images and their (pseudo-)labels.

Labels come from stage 1's ``pseudo_labels.csv`` (every training image: the labeled subset with its
given label, the rest with the teacher's label), from a user's CSV, or from the data set's true
labels (``diffusion.labels=true``, the oracle). The EMA weights are what is saved and sampled.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from dpt.diffusion.codec import Codec, load_vae, model_space
from dpt.diffusion.model import build_denoiser, denoiser_forward, drop_labels, save_generator
from dpt.diffusion.sampling import (
    image_noise,
    loss_weights,
    make_noise_scheduler,
    make_sampler,
    sample,
    training_target,
)
from dpt.errors import DPTError
from semivit.config.schema import Config
from semivit.data.sources import ImageSource, build_data
from semivit.runtime.layout import SAMPLES, layout
from semivit.runtime.loop import Trainer

logger = logging.getLogger("dpt")

# below this many uint8 values the training images are decoded once and kept in memory
PRELOAD_LIMIT = 256 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingLabels:
    indices: np.ndarray  # positions in the training ImageSource
    labels: np.ndarray  # class id per index
    source: str  # "true" or the CSV path
    info: dict = field(default_factory=dict)


def read_labels_csv(path: Path, source: ImageSource) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices, labels, confidences or None) of a labels CSV: columns ``index,label`` and optionally
    ``path`` (checked against the data set) and ``confidence``. Read row by row into flat arrays
    (a few bytes per image, also at 1.28M rows)."""
    from array import array

    if not path.is_file():
        raise DPTError(f"labels file '{path}' (diffusion.labels) not found")
    idx_a, lab_a, conf_a = array("q"), array("q"), array("d")
    differ, first_differ = 0, ""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "label") if c not in columns]
        if columns and missing:
            raise DPTError(f"labels file '{path}' lacks column(s) {missing}; found {list(columns)}")
        has_path, has_conf = "path" in columns, "confidence" in columns
        for r in reader:
            try:
                i, y = int(r["index"]), int(r["label"])
            except (TypeError, ValueError) as e:
                raise DPTError(f"labels file '{path}': index and label must be integers ({e})") from e
            idx_a.append(i)
            lab_a.append(y)
            if has_conf:
                try:
                    conf_a.append(float(r["confidence"]) if r["confidence"] != "" else 1.0)
                except (TypeError, ValueError) as e:
                    raise DPTError(f"labels file '{path}': non-numeric confidence ({e})") from e
            if has_path and r["path"] and 0 <= i < len(source) and r["path"] != source.paths[i]:
                differ += 1
                first_differ = first_differ or r["path"]
    if not idx_a:
        raise DPTError(f"labels file '{path}' (diffusion.labels) has no rows; it needs columns index,label")
    idx, lab = np.frombuffer(idx_a, dtype=np.int64).copy(), np.frombuffer(lab_a, dtype=np.int64).copy()
    bad = idx[(idx < 0) | (idx >= len(source))]
    if len(bad):
        raise DPTError(
            f"labels file '{path}' has indices outside [0, {len(source)}) of the training set, e.g. "
            f"{bad[:5].tolist()}; it was made for another data set (check data.name / data.max_train)"
        )
    if len(np.unique(idx)) != len(idx):
        raise DPTError(f"labels file '{path}' lists some index more than once; keep one row per image")
    k = source.num_classes
    wrong = lab[(lab < 0) | (lab >= k)]
    if len(wrong):
        raise DPTError(
            f"labels file '{path}' has labels outside 0..{k - 1} (the data set has {k} classes), e.g. "
            f"{wrong[:5].tolist()}"
        )
    if differ:
        raise DPTError(
            f"labels file '{path}': {differ} paths differ from the data set at the same index "
            f"(e.g. '{first_differ}'); the data set changed since the file was written"
        )
    conf = np.frombuffer(conf_a, dtype=np.float64).copy() if has_conf else None
    return idx, lab, conf


def load_training_labels(cfg: Config, source: ImageSource) -> TrainingLabels:
    """The (index, label) pairs to train on, after the confidence filter and the per-class cap."""
    dcfg = cfg.diffusion
    setting = dcfg.labels.strip()
    if setting == "true":
        idx = np.flatnonzero(source.targets >= 0)  # your own data: its labeled images only
        lab, conf = source.targets[idx].copy(), None
        origin = "true"
    else:
        path = layout(cfg).pseudo_labels_csv if setting in ("", "auto") else Path(setting)
        if setting in ("", "auto") and not path.is_file():
            raise DPTError(
                f"diffusion.labels=auto reads '{path}', which does not exist: run the pseudo-label stage first, "
                "or set diffusion.labels=true (the data set's labels) or diffusion.labels=PATH (your CSV)"
            )
        idx, lab, conf = read_labels_csv(path, source)
        origin = str(path)
    info: dict = {"rows": len(idx)}
    keep = np.ones(len(idx), dtype=bool)
    if dcfg.min_confidence > 0:
        if conf is None:
            raise DPTError(
                f"diffusion.min_confidence={dcfg.min_confidence} needs a 'confidence' column in '{origin}'; "
                "set diffusion.min_confidence=0"
            )
        keep &= conf >= dcfg.min_confidence
    idx, lab = idx[keep], lab[keep]
    conf = conf[keep] if conf is not None else None
    if dcfg.max_per_class > 0:
        # the most confident images of each class (all equal without confidences: lowest indices)
        order = np.lexsort((idx, -(conf if conf is not None else np.ones(len(idx)))))
        taken, chosen = np.zeros(source.num_classes, dtype=np.int64), []
        for j in order:
            if taken[lab[j]] < dcfg.max_per_class:
                taken[lab[j]] += 1
                chosen.append(j)
        chosen = np.sort(np.array(chosen, dtype=np.int64))
        idx, lab = idx[chosen], lab[chosen]
    if len(idx) == 0:
        raise DPTError(
            f"no training images left from '{origin}' after diffusion.min_confidence={dcfg.min_confidence}; "
            "lower diffusion.min_confidence"
        )
    counts = np.bincount(lab, minlength=source.num_classes)
    empty = [source.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        logger.warning("classes with no training images (the model can still be asked for them): %s", empty[:10])
    info.update({"num_images": int(len(idx)), "per_class": counts.tolist()})
    if origin != "true":
        # against the true labels where the data set has them (your own data's unlabeled images have none)
        known = source.targets[idx] >= 0
        if source.given_labels:
            info["label_acc_vs_true"] = None
            info["label_acc_vs_true_unavailable"] = "the unlabeled images have no true label (your own data)"
        elif known.any():
            info["label_acc_vs_true"] = float(np.mean(source.targets[idx][known] == lab[known]))

    return TrainingLabels(idx, lab, origin, info)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class PixelDataset(Dataset):
    """``(uint8 C x S x S image, label)``; small sets are decoded once and kept in memory."""

    def __init__(self, source: ImageSource, labels: TrainingLabels, channels: int, size: int):
        self.source, self.indices, self.labels = source, labels.indices, labels.labels
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor()])
        self.cache = None
        if len(self.indices) * channels * size * size <= PRELOAD_LIMIT:
            self.cache = torch.stack([self._load(k) for k in range(len(self.indices))])

    def _load(self, k: int) -> torch.Tensor:
        return self.transform(self.source.load(int(self.indices[k])).convert(self.mode))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        img = self.cache[k] if self.cache is not None else self._load(k)
        return img, int(self.labels[k])


class RowDataset(Dataset):
    """``(row, label)`` into a cached latent set: in latent space with ``diffusion.cache_latents``
    the images were encoded once and a step only draws from their cached posteriors."""

    def __init__(self, labels: TrainingLabels):
        self.labels = labels.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, k: int):
        return k, int(self.labels[k])


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def stage_dir_of(cfg: Config) -> Path:
    return layout(cfg).stage2


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """uint8 (N, C, H, W) images as one PNG grid, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    from semivit.files import atomic_path

    grid = make_grid(images, nrow=nrow, padding=1, pad_value=255)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def sample_grid(
    model, noise_scheduler, codec, meta: dict, path: Path, device, per_class: int = 8, steps: int = 20
) -> None:
    """A grid of EMA samples (one row per class, at most 10 classes) during training."""
    k = len(meta["classes"])
    classes = list(range(min(k, 10)))
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    seeds = [1000 * c + i for c in classes for i in range(per_class)]
    noise, gens = image_noise(seeds, (meta["model_channels"], meta["model_size"], meta["model_size"]), device)
    sampler = make_sampler(noise_scheduler.config, "dpmsolver++")
    x = sample(model, sampler, noise, labels, k, 2.0, steps, gens)
    save_grid(to_uint8(codec.decode(x)).cpu(), path, nrow=per_class)


def run_train_diffusion(cfg: Config) -> Path:
    dcfg = cfg.diffusion
    stage_dir = stage_dir_of(cfg)
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    labels = load_training_labels(cfg, bundle.train)
    trainer = Trainer(
        cfg,
        "diffusion",
        stage_dir,
        sections=("data", "diffusion"),
        amp=dcfg.amp,
        grad_accum=dcfg.grad_accum,
        clip_grad=dcfg.clip_grad,
        nonfinite_hint="lower diffusion.lr or set diffusion.amp=no",
    )
    device = trainer.device

    image_size = dcfg.image_size or cfg.data.image_size
    vae = load_vae(dcfg.vae) if dcfg.vae else None
    codec = Codec(vae).to(device)
    m_channels, m_size = model_space(vae, bundle.channels, image_size)
    k = bundle.num_classes
    meta = {
        "classes": list(bundle.classes),
        "num_classes": k,
        "null_label": k,
        "channels": bundle.channels,
        "image_size": image_size,
        "model_channels": m_channels,
        "model_size": m_size,
        "vae": str(Path(dcfg.vae).resolve()) if dcfg.vae else "",
        "latent_scaling": codec.scale,
        "data": cfg.data.name,
        "labels": labels.source,
    }

    model = build_denoiser(dcfg, k, m_channels, m_size).to(device)  # on the device before its optimizer (fused AdamW)
    noise_scheduler = make_noise_scheduler(dcfg, latent=vae is not None)
    from diffusers.training_utils import EMAModel

    # EMA with warm-up: the decay starts near 0 and grows with the step count, so early weights
    # are not averaged in with a large weight on a short run
    ema = EMAModel(
        model.parameters(),
        decay=dcfg.ema_decay,
        use_ema_warmup=dcfg.ema_warmup,
        power=3 / 4,
        model_cls=type(model),
        model_config=model.config,
    )
    latents = None
    if vae is not None and dcfg.cache_latents:
        from dpt.diffusion.latents import load_or_build_latents

        latents = load_or_build_latents(
            layout(cfg).latents, bundle.train, labels.indices, codec.vae, image_size, bundle.channels,
            dcfg.hflip, dcfg.batch_size, trainer.accelerator, cfg.data.num_workers, dcfg.latent_dtype,
        ).to(device)
        dataset = RowDataset(labels)
    else:
        dataset = PixelDataset(bundle.train, labels, bundle.channels, image_size)
    loader = trainer.loader(dataset, dcfg.batch_size, shuffle=True, drop_last=len(dataset) >= dcfg.batch_size * trainer.accelerator.num_processes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay, **_fused(model))
    model, loader = trainer.prepare(model, optimizer, loader)
    ema.to(device)
    total_steps = max(1, dcfg.epochs * trainer.updates_per_epoch)
    trainer.schedule(dcfg.epochs, min(dcfg.warmup_steps, total_steps // 2), min_lr_ratio=final_lr_ratio(dcfg))
    trainer.track(ema=ema)
    resumed = trainer.resume()
    resumed_from = trainer.state.epoch if resumed else None
    logger.info(
        "train-diffusion: %d images, %d classes, labels from %s, %s %s params, %d steps/epoch",
        len(dataset),
        k,
        labels.source,
        dcfg.model,
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        trainer.updates_per_epoch,
    )

    raw = trainer.accelerator.unwrap_model(model)
    seen = {"images": 0}
    start = time.time()

    def step(batch):
        x, y = batch
        if latents is not None:  # x: rows of the cached posteriors
            flip = torch.rand(x.shape[0], device=device) < 0.5 if dcfg.hflip else None
            x0 = latents.sample(x, flip)
        else:
            x = to_unit_range(x)
            if dcfg.hflip:
                flip = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x0 = codec.encode(x)
        y = drop_labels(y, k, dcfg.p_uncond)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = noise_scheduler.add_noise(x0, noise, t)
        with trainer.accelerator.autocast():
            pred = denoiser_forward(model, xt, t, y)
        seen["images"] += x.shape[0] * trainer.accelerator.num_processes
        target = training_target(noise_scheduler, x0, noise, t).float()
        weights = loss_weights(noise_scheduler, t, dcfg.min_snr_gamma)
        if weights is None:
            return {"loss": F.mse_loss(pred.float(), target)}
        return {"loss": (weights * (pred.float() - target).pow(2).flatten(1).mean(1)).mean()}

    def on_update(step_: int) -> None:
        ema.step(raw.parameters())
        if dcfg.sample_every and (step_ + 1) % dcfg.sample_every == 0:
            _grid(trainer.accelerator, raw, ema, noise_scheduler, codec, meta, stage_dir, step_ + 1, cfg.smoke)

    def end_epoch(row: dict) -> None:
        if not dcfg.sample_every and (row["epoch"] % 10 == 0 or row["epoch"] == dcfg.epochs):
            _grid(trainer.accelerator, raw, ema, noise_scheduler, codec, meta, stage_dir, row["step"], cfg.smoke)

    trainer.fit(
        dcfg.epochs,
        lambda epoch: loader,
        step,
        on_update=on_update,
        end_epoch=end_epoch,
        checkpoint_every=dcfg.checkpoint_every,
    )
    seconds = time.time() - start
    state = trainer.state

    def write():
        final = build_denoiser(dcfg, k, m_channels, m_size)
        ema.copy_to(final.parameters())
        save_generator(layout(cfg).generator, final, noise_scheduler, meta)

    metrics = {
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "seconds": seconds,
        "train_images_per_second": seen["images"] / seconds if seconds > 0 else None,
        "num_images": int(len(dataset)),
        "num_classes": k,
        "label_source": labels.source,
        "labels": labels.info,
        "epochs": state.epoch,
        "steps": state.step,
        "ema_steps": int(ema.optimization_step),
        "resumed_from_epoch": resumed_from,
        "model": dcfg.model,
        "num_params": sum(p.numel() for p in raw.parameters()),
    }
    trainer.finish(metrics, write, "train-diffusion")
    logger.info("train-diffusion done in %.0f s: %s", seconds, layout(cfg).generator)
    return stage_dir


def final_lr_ratio(dcfg) -> float:
    """The lr at the end of training over the set lr: cosine decays to a tenth; constant (DiT's
    published schedule) keeps the lr after the warm-up."""
    return 1.0 if dcfg.lr_schedule == "constant" else 0.1


def _fused(model) -> dict:
    """Fused AdamW (one kernel per parameter group) where the parameters live on a GPU."""
    return {"fused": True} if next(model.parameters()).is_cuda else {}


def _grid(accelerator, raw, ema, noise_scheduler, codec, meta, stage_dir: Path, step: int, smoke: bool = False) -> None:
    if not accelerator.is_main_process:
        return
    ema.store(raw.parameters())
    ema.copy_to(raw.parameters())
    raw.eval()
    try:
        sample_grid(
            raw,
            noise_scheduler,
            codec,
            meta,
            stage_dir / SAMPLES / f"step_{step:07d}.png",
            accelerator.device,
            per_class=1 if smoke else 8,
            steps=2 if smoke else 20,
        )
    finally:
        ema.restore(raw.parameters())
        raw.train()
