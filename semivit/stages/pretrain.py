"""Stage 0: MAE self-pre-training of the encoder on every training image (labels unused).

Writes ``<output_dir>/stage0/``: ``encoder.safetensors`` (timm VisionTransformer keys, loadable
with ``models.load_encoder_weights``), ``metrics.json``, ``history.json``, ``curves.png``,
``reconstruction.png``, ``config.yaml`` and TensorBoard ``logs/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2

from semivit.config.schema import Config
from semivit.data.sources import build_data
from semivit.data.views import ViewDataset, build_transforms
from semivit.files import atomic_path, pyplot, save_weights
from semivit.models.mae import create_mae
from semivit.runtime.layout import layout
from semivit.runtime.loop import Trainer

logger = logging.getLogger("semivit")


def save_reconstructions(mae, images: torch.Tensor, mean, std, path: Path, seed: int = 0) -> None:
    """Rows: input, masked input, reconstruction (visible patches kept, masked ones predicted)."""
    plt = pyplot()

    g = torch.Generator(device=images.device).manual_seed(seed)
    was_training = mae.training
    mae.eval()
    masked, recon = mae.reconstruct(images, g)
    mae.train(was_training)
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    rows = [images.float() * s + m, masked * s + m, recon * s + m]
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.1 * n, 3.5), squeeze=False)
    for r, (name, batch) in enumerate(zip(("input", "masked", "reconstruction"), rows, strict=True)):
        for c in range(n):
            img = batch[c].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run_pretrain(cfg: Config) -> Path:
    pc = cfg.pretrain
    stage_dir = layout(cfg).stage0
    trainer = Trainer(
        cfg,
        "mae",
        stage_dir,
        sections=("data", "model", "pretrain"),
        amp=pc.amp,
        grad_accum=pc.grad_accum,
        nonfinite_hint="lower pretrain.lr or set pretrain.amp=no",
    )
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    tf = build_transforms(cfg.data, bundle)
    # MAE's only augmentation: random translation (small images) or random resized crop (ImageNet)
    dataset = ViewDataset(bundle.train, np.arange(len(bundle.train)), tf["pretrain"])
    loader = trainer.loader(dataset, pc.batch_size, shuffle=True)
    mae = create_mae(cfg.model, pc, cfg.data.image_size, bundle.channels).to(trainer.device)
    fused = {"fused": True} if trainer.device.type == "cuda" else {}  # one kernel per group, built on the device
    opt = create_optimizer_v2(mae, "adamw", lr=pc.lr, weight_decay=pc.weight_decay, betas=(0.9, 0.95), **fused)
    mae, loader = trainer.prepare(mae, opt, loader)
    trainer.schedule(pc.epochs, int(pc.warmup_epochs * trainer.updates_per_epoch), pc.min_lr / pc.lr)
    trainer.resume()
    logger.info(
        "stage 0 (MAE): %d images, %d epochs, %d steps/epoch", len(dataset), pc.epochs, trainer.updates_per_epoch
    )

    def step(batch):
        images = batch[0]
        with trainer.accelerator.autocast():
            loss, _, _ = mae(images)
        return {"loss": loss}

    trainer.fit(pc.epochs, lambda epoch: loader, step)

    def write():
        model = trainer.accelerator.unwrap_model(mae)
        save_weights(model.encoder.state_dict(), layout(cfg).encoder, {"model": cfg.model.name})
        # spread over the data set (class-sorted sources would otherwise show one class)
        show = np.linspace(0, len(dataset) - 1, min(8, len(dataset))).astype(int)
        sample = torch.stack([dataset[int(i)][0] for i in show]).to(trainer.device)
        save_reconstructions(model, sample, bundle.mean, bundle.std, layout(cfg).reconstruction, cfg.seed)

    history = trainer.state.history
    metrics = {
        "loss": history[-1]["loss"] if history else float("nan"),
        "epochs": pc.epochs,
        "num_images": len(dataset),
        "seconds": round(trainer.seconds, 1),
    }
    trainer.finish(metrics, write, "stage 0: MAE pre-training")
    return stage_dir
