"""Stage 0: MAE self-pre-training of the encoder on every training image (labels unused).

Writes ``<output_dir>/stage0/``: ``encoder.safetensors`` (timm VisionTransformer keys, loadable
with ``models.load_encoder_weights``), ``metrics.json``, ``history.json``, ``curves.png``,
``reconstruction.png``, ``config.yaml`` and TensorBoard ``logs/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from semivit.config import Config
from semivit.data import ViewDataset, build_data, build_transforms
from semivit.engine import (
    TrainState,
    finish_trackers,
    make_accelerator,
    maybe_resume,
    plot_curves,
    prepare_stage_dir,
    remove_checkpoints,
    save_checkpoint,
    warmup_cosine,
    write_metrics,
)
from semivit.io import atomic_path, atomic_write_json, save_weights
from semivit.mae import create_mae
from semivit.stage import Timer, check_stop, make_loader

logger = logging.getLogger("semivit")


def save_reconstructions(mae, images: torch.Tensor, mean, std, path: Path, seed: int = 0) -> None:
    """Rows: input, masked input, reconstruction (visible patches kept, masked ones predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    stage_dir = cfg.run_dir / "stage0"
    accelerator = make_accelerator(cfg, stage_dir, pc.amp, pc.grad_accum)
    prepare_stage_dir(cfg, stage_dir, accelerator, "stage0")
    bundle = build_data(cfg.data)
    tf = build_transforms(cfg.data, bundle)
    # the weak view (random translation) is MAE's only augmentation, as random resized crop is there
    dataset = ViewDataset(bundle.train, np.arange(len(bundle.train)), tf["weak"])
    loader = make_loader(dataset, pc.batch_size, shuffle=True, cfg=cfg)
    mae = create_mae(cfg.model, pc, cfg.data.image_size, bundle.channels)
    opt = create_optimizer_v2(mae, "adamw", lr=pc.lr, weight_decay=pc.weight_decay, betas=(0.9, 0.95))
    # single-process optimizer steps: accelerate's prepared scheduler advances num_processes steps per call
    steps_per_epoch = math.ceil(len(loader) / pc.grad_accum)
    sched = warmup_cosine(opt, int(pc.warmup_epochs * steps_per_epoch), pc.epochs * steps_per_epoch, pc.min_lr / pc.lr)
    mae, opt, loader, sched = accelerator.prepare(mae, opt, loader, sched)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    maybe_resume(cfg, accelerator, stage_dir)
    timer = Timer(state)
    logger.info("stage 0 (MAE): %d images, %d epochs, %d steps/epoch", len(dataset), pc.epochs, steps_per_epoch)

    for epoch in range(state.epoch, pc.epochs):
        mae.train()
        total, count = torch.zeros((), device=accelerator.device), 0
        bar = tqdm(loader, desc=f"mae {epoch + 1}/{pc.epochs}", leave=False, disable=not accelerator.is_local_main_process)
        for images, _, _ in bar:
            with accelerator.accumulate(mae):
                with accelerator.autocast():
                    loss, _, _ = mae(images)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MAE loss is {loss.item()} at epoch {epoch + 1}; lower pretrain.lr or set pretrain.amp=no")
            total += loss.detach()
            count += 1
            state.step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        mean_loss = accelerator.reduce(total / max(1, count), "mean").item()
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, "loss": mean_loss, "lr": opt.param_groups[0]["lr"], "seconds": timer.seconds}
        state.history.append(row)
        accelerator.log({"loss": mean_loss, "lr": row["lr"]}, step=state.epoch)
        logger.info("mae epoch %d/%d loss %.4f (%.0fs)", state.epoch, pc.epochs, mean_loss, timer.seconds)
        if state.epoch < pc.epochs:
            save_checkpoint(accelerator, stage_dir, state.epoch)
            check_stop(cfg, state.epoch)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(mae)
        save_weights(model.encoder.state_dict(), stage_dir / "encoder.safetensors", {"model": cfg.model.name})
        # spread over the data set (class-sorted sources would otherwise show one class)
        show = np.linspace(0, len(dataset) - 1, min(8, len(dataset))).astype(int)
        sample = torch.stack([dataset[int(i)][0] for i in show]).to(accelerator.device)
        save_reconstructions(model, sample, bundle.mean, bundle.std, stage_dir / "reconstruction.png", cfg.seed)
        write_metrics(
            stage_dir,
            {
                "loss": state.history[-1]["loss"] if state.history else float("nan"),
                "epochs": pc.epochs,
                "num_images": len(dataset),
                "seconds": round(timer.seconds, 1),
            },
        )
        atomic_write_json(stage_dir / "history.json", state.history)
        plot_curves(state.history, stage_dir / "curves.png", "stage 0: MAE pre-training")
    accelerator.wait_for_everyone()
    remove_checkpoints(accelerator, stage_dir)
    if cfg.tensorboard and accelerator.log_with:
        finish_trackers(accelerator)
    return stage_dir
