"""Stage 1a: supervised fine-tuning on the labeled subset.

AdamW with layer-wise lr decay, per-iteration warm-up + cosine, label smoothing, optional
Mixup/CutMix (timm), drop path and an EMA copy of the model (timm ModelEmaV3, saved with the
Accelerate state). Writes ``<output_dir>/stage1/finetune/`` (see ``stage.finish_classifier_stage``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from tqdm.auto import tqdm

from semivit.config import Config
from semivit.data import ImageSource, ViewDataset, build_data, build_transforms, make_split
from semivit.engine import TrainState, make_accelerator, maybe_resume, prepare_stage_dir, save_checkpoint, warmup_cosine
from semivit.evaluate import evaluate_models, make_test_loader
from semivit.stage import (
    Timer,
    build_classifier,
    check_stop,
    finish_classifier_stage,
    make_ema,
    make_loader,
    make_optimizer,
    optimizer_step,
    resolve_init,
    update_ema,
)

logger = logging.getLogger("semivit")


def make_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Mixup | None:
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def run_finetune(
    cfg: Config,
    out_dir: Path | None = None,
    init: str | None = None,
    labeled: tuple[ImageSource, np.ndarray] | None = None,
) -> Path:
    fc = cfg.finetune
    stage_dir = Path(out_dir) if out_dir else cfg.run_dir / "stage1" / "finetune"
    accelerator = make_accelerator(cfg, stage_dir, fc.amp, fc.grad_accum)
    prepare_stage_dir(cfg, stage_dir, accelerator, "finetune")
    bundle = build_data(cfg.data)
    tf = build_transforms(cfg.data, bundle)
    split = make_split(cfg.data, bundle.train, cfg.seed)
    source, idx = labeled if labeled is not None else (bundle.train, split.labeled)
    if source.num_classes != bundle.num_classes:
        raise ValueError(f"the labeled set has {source.num_classes} classes, data '{cfg.data.name}' has {bundle.num_classes}")
    train_ds = ViewDataset(source, idx, tf["train"])
    # timm Mixup needs an even batch, hence drop_last
    loader = make_loader(train_ds, fc.batch_size, shuffle=True, cfg=cfg, drop_last=True)

    model = build_classifier(cfg, bundle, resolve_init(cfg, init))
    ema = make_ema(model, fc.ema_decay, warmup=True)
    opt = make_optimizer(model, fc.lr, fc.weight_decay, fc.layer_decay)
    steps_per_epoch = math.ceil(len(loader) / fc.grad_accum)
    sched = warmup_cosine(opt, int(fc.warmup_epochs * steps_per_epoch), fc.epochs * steps_per_epoch, fc.min_lr / fc.lr)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    test_loader = accelerator.prepare(make_test_loader(cfg, bundle))
    ema.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(ema)
    maybe_resume(cfg, accelerator, stage_dir)
    timer = Timer(state)

    mixup = make_mixup(fc.mixup, fc.cutmix, fc.label_smoothing, bundle.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=fc.label_smoothing)
    logger.info("stage 1a (fine-tune): %d labeled images, %d epochs, %d steps/epoch", len(train_ds), fc.epochs, len(loader))

    for epoch in range(state.epoch, fc.epochs):
        model.train()
        total, count = torch.zeros((), device=accelerator.device), 0
        bar = tqdm(loader, desc=f"finetune {epoch + 1}/{fc.epochs}", leave=False, disable=not accelerator.is_local_main_process)
        for images, labels, _ in bar:
            with accelerator.accumulate(model):
                if mixup:
                    images, labels = mixup(images, labels)
                with accelerator.autocast():
                    loss = criterion(model(images), labels)
                accelerator.backward(loss)
                optimizer_step(accelerator, model, opt, sched, fc.clip_grad)
            update_ema(accelerator, model, ema, state)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch + 1}; lower finetune.lr")
            total += loss.detach()
            count += 1
        state.epoch = epoch + 1
        row = {
            "epoch": state.epoch,
            "loss": accelerator.reduce(total / max(1, count), "mean").item(),
            "lr": max(g["lr"] for g in opt.param_groups),
        }
        if fc.eval_every and state.epoch % fc.eval_every == 0 and state.epoch < fc.epochs:
            m = evaluate_models(model, ema, test_loader, accelerator, bundle.num_classes)
            row.update(top1=m["top1"], top1_ema=m["top1_ema"])
        row["seconds"] = timer.seconds
        state.history.append(row)
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
        if "top1" in row or state.epoch == 1:
            logger.info("finetune epoch %d/%d %s", state.epoch, fc.epochs, _fmt(row))
        if state.epoch < fc.epochs:
            save_checkpoint(accelerator, stage_dir, state.epoch)
            check_stop(cfg, state.epoch)

    final = evaluate_models(model, ema, test_loader, accelerator, bundle.num_classes)
    if state.history:
        state.history[-1].update(top1=final["top1"], top1_ema=final["top1_ema"])
    metrics = {
        "top1": final["top1"],
        "top1_ema": final["top1_ema"],
        "top5": final["top5"],
        "top5_ema": final["top5_ema"],
        "num_labeled": int(len(idx)),
        "num_unlabeled": int(len(split.unlabeled)) if labeled is None else 0,
        "num_test": final["num_test"],
        "per_class_acc_ema": final["per_class_acc_ema"],
        "init": resolve_init(cfg, init) or "random",
        "epochs": fc.epochs,
        "seconds": round(timer.seconds, 1),
    }
    logger.info("finetune done: top1 %.2f  top1_ema %.2f (%.0fs)", metrics["top1"], metrics["top1_ema"], timer.seconds)
    finish_classifier_stage(cfg, accelerator, stage_dir, model, ema, bundle, state, metrics, source, idx, "stage 1a: fine-tuning")
    return stage_dir


def _fmt(row: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)))
