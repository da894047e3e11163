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

from semivit.config.schema import Config
from semivit.data.run_split import run_split
from semivit.data.sources import ImageSource, build_data
from semivit.data.split import make_split
from semivit.data.views import ViewDataset, build_transforms
from semivit.errors import DataError
from semivit.runtime.layout import layout
from semivit.runtime.loop import Trainer
from semivit.stages.common import (
    build_classifier,
    classifier_outputs,
    cycle,
    labeled_loaders,
    make_ema,
    make_optimizer,
    next_labeled,
    resolve_init,
)
from semivit.stages.evaluate import evaluate_models, make_test_loader, pct

logger = logging.getLogger("semivit")


def make_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Mixup | None:
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def _training_set(cfg: Config, bundle, labeled, use_run_split: bool, name: str) -> tuple[ImageSource, np.ndarray, int]:
    """The labeled images to train on and how many unlabeled ones the split leaves."""
    if labeled is not None:
        return (*labeled, 0)
    split = run_split(cfg, bundle.train, name) if use_run_split else make_split(cfg.data, bundle.train, cfg.seed)
    return bundle.train, split.labeled, int(len(split.unlabeled))


def run_finetune(
    cfg: Config,
    out_dir: Path | None = None,
    init: str | None = None,
    labeled: tuple[ImageSource, np.ndarray] | None = None,
    name: str = "finetune",
    use_run_split: bool = True,
    extra: ImageSource | None = None,
    extra_ratio: float = 0.5,
    info: dict | None = None,
) -> Path:
    """Fine-tune on the run's labeled split (``<run>/label_split.csv``), or on ``labeled`` (source,
    indices) when given. ``use_run_split=False``: a classifier of other label settings than the
    run's (the judge, on every label) draws its split in memory and leaves the run's file alone.
    ``extra`` (synthetic or pseudo-labeled images) fills ``extra_ratio`` of every batch; an epoch
    keeps the optimizer steps of the real labeled images alone, so a run with extra images costs
    what its K = 0 control costs."""
    fc = cfg.finetune
    stage_dir = Path(out_dir) if out_dir else layout(cfg).finetune
    trainer = Trainer(
        cfg,
        name,
        stage_dir,
        sections=("data", "model", "finetune", "retrain") if labeled is not None or extra is not None else ("data", "model", "finetune"),
        amp=fc.amp,
        grad_accum=fc.grad_accum,
        clip_grad=fc.clip_grad,
        nonfinite_hint="lower finetune.lr or set finetune.amp=no",
    )
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    tf = build_transforms(cfg.data, bundle)
    source, idx, num_unlabeled = _training_set(cfg, bundle, labeled, use_run_split, name)
    if source.num_classes != bundle.num_classes:
        raise DataError(f"the labeled set has {source.num_classes} classes, data '{cfg.data.name}' has {bundle.num_classes}")
    train_ds = ViewDataset(source, idx, tf["train"])
    # timm Mixup needs an even batch, hence drop_last
    loader = trainer.loader(train_ds, fc.batch_size, shuffle=True, drop_last=True)
    loaders = [loader]
    if extra is not None:
        if source is not bundle.train:
            raise DataError("extra images are mixed into the run's real labeled split, not into a given labeled set")
        loaders = labeled_loaders(trainer, bundle, idx, tf["train"], fc.batch_size, extra, extra_ratio)

    model = build_classifier(cfg, bundle, resolve_init(cfg, init))
    model.to(trainer.device)  # the optimizer is built on the device (fused AdamW on CUDA)
    ema = make_ema(model, fc.ema_decay, warmup=True)
    opt = make_optimizer(model, fc.lr, fc.weight_decay, fc.layer_decay)
    if extra is None:
        model, loader = trainer.prepare(model, opt, loader)
    else:  # the K = 0 control's steps: one pass of the real images at the full batch size
        steps = math.ceil(len(loader) / trainer.accelerator.num_processes)
        model, *loaders = trainer.prepare(model, opt, *loaders, micro_steps=steps)
        iters = [cycle(ld) for ld in loaders]
    trainer.schedule(fc.epochs, int(fc.warmup_epochs * trainer.updates_per_epoch), fc.min_lr / fc.lr)
    test_loader = trainer.accelerator.prepare(make_test_loader(cfg, bundle))
    ema.to(trainer.device)
    trainer.track(ema=ema)
    trainer.resume()

    mixup = make_mixup(fc.mixup, fc.cutmix, fc.label_smoothing, bundle.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=fc.label_smoothing)
    logger.info(
        "stage 1a (%s): %d labeled images%s, %d epochs, %d steps/epoch", name, len(train_ds),
        f" + {len(extra)} extra ({extra_ratio:g} of each batch)" if extra is not None else "", fc.epochs,
        trainer.updates_per_epoch,
    )

    def batches(epoch):
        if extra is None:
            return loader
        return ((*next_labeled(iters), None) for _ in range(trainer.micro_per_epoch))

    def step(batch):
        images, labels, _ = batch
        if mixup:
            if len(images) % 2:  # timm's Mixup needs an even batch (a small real set beside the extra images)
                images, labels = images[:-1], labels[:-1]
            images, labels = mixup(images, labels)
        with trainer.accelerator.autocast():
            loss = criterion(model(images), labels)
        return {"loss": loss}

    def end_epoch(row: dict) -> None:
        epoch = row["epoch"]
        if fc.eval_every and epoch % fc.eval_every == 0 and epoch < fc.epochs:
            m = evaluate_models(model, ema, test_loader, trainer.accelerator, bundle.num_classes)
            row.update(top1=m["top1"], top1_ema=m["top1_ema"])

    trainer.fit(
        fc.epochs,
        batches,
        step,
        on_update=lambda s: ema.update(trainer.accelerator.unwrap_model(model), step=s),
        end_epoch=end_epoch,
        log_every=max(1, fc.epochs // 10),
    )

    final = evaluate_models(model, ema, test_loader, trainer.accelerator, bundle.num_classes)
    if trainer.state.history:
        trainer.state.history[-1].update(top1=final["top1"], top1_ema=final["top1_ema"])
    metrics = {
        "top1": final["top1"],
        "top1_ema": final["top1_ema"],
        "top5": final["top5"],
        "top5_ema": final["top5_ema"],
        "num_labeled": int(len(idx)),
        "num_unlabeled": num_unlabeled,
        **({"num_extra": len(extra), "extra_ratio": extra_ratio} if extra is not None else {}),
        "num_test": final["num_test"],
        "per_class_acc_ema": final["per_class_acc_ema"],
        "init": resolve_init(cfg, init) or "random",
        "epochs": fc.epochs,
        "seconds": round(trainer.seconds, 1),
        **(info or {}),
    }
    logger.info("%s done: top1 %s  top1_ema %s (%.0fs)", name, pct(metrics["top1"]), pct(metrics["top1_ema"]), trainer.seconds)
    write = classifier_outputs(cfg, trainer, model, ema, bundle, source, idx)
    trainer.finish(metrics, write, "stage 1a: fine-tuning")
    return stage_dir
