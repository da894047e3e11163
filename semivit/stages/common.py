"""Pieces shared by the classifier stages (finetune, semi, retrain): model init, the layer-decay
optimizer, loaders, the EMA model and the stage's final outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from torchvision import transforms as T

from semivit.config.schema import Config
from semivit.data.split import save_label_split
from semivit.data.views import ViewDataset
from semivit.errors import DataError
from semivit.models.classifier import (
    classifier_meta,
    create_classifier,
    init_head,
    load_encoder_weights,
    save_classifier,
)
from semivit.runtime.accelerator import use_cpu
from semivit.runtime.layout import LABEL_SPLIT, layout
from semivit.runtime.loop import pin_batches, seed_worker
from semivit.stages.class_checks import check_classifier_classes

logger = logging.getLogger("semivit")


def resolve_init(cfg: Config, init: str | None) -> str | None:
    """``auto``: this run's stage-0 encoder when it exists, else random; ``none``; or a path."""
    init = cfg.model.init if init is None else init
    if init in ("", "none"):
        return None
    if init == "auto":
        enc = layout(cfg).encoder
        return str(enc) if enc.is_file() else None
    if not Path(init).exists():
        raise FileNotFoundError(f"model.init='{init}' not found; use auto, none or the path of a weights file/folder")
    return init


def build_classifier(cfg: Config, bundle, init: str | None, strict_head: bool = False):
    model = create_classifier(cfg.model, bundle.num_classes, cfg.data.image_size, bundle.channels)
    if init:
        # a classifier folder's head rows mean its classes: they must be the data's, in order
        check_classifier_classes(init, bundle.classes, cfg.data, "model.init / checkpoint", "start from a classifier of this data set")
        report = load_encoder_weights(model, init, strict_head=strict_head)
        if any(k.startswith("head.") for k in report.missing):  # a new head (MAE weights): MAE's head init
            init_head(model)
        logger.info("init: %s", report.summary())
    else:
        logger.info("init: random")
    return model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float, fused: bool | None = None):
    """AdamW with timm's layer-wise lr decay groups. timm stores each group's factor as
    ``lr_scale`` for its own schedulers; with a torch LambdaLR it must be applied to the group lr.
    ``fused`` (default: on CUDA) runs the update as one kernel per parameter group."""
    if fused is None:
        fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    if layer_decay < 1 and not hasattr(model, "group_matcher"):
        logger.info("layer decay: %s defines no parameter groups, plain AdamW (one lr)", type(model).__name__)
        layer_decay = 1.0
    elif layer_decay < 1:
        logger.info("layer decay %g over %s's parameter groups (timm group_matcher)", layer_decay, type(model).__name__)
    opt = create_optimizer_v2(
        model,
        "adamw",
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay if layer_decay < 1 else None,
        **({"fused": True} if fused else {}),
    )
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return opt


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = False) -> ModelEmaV3:
    """EMA copy of ``model``. With ``warmup`` the decay ramps up as 1 - (1 + step)^(-2/3) (capped at
    ``decay``): a short run from a random or fresh head would otherwise average mostly early weights."""
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
    ema.eval()
    return ema


def make_loader(dataset, batch_size: int, shuffle: bool, cfg: Config, drop_last: bool = True) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last and len(dataset) >= batch_size,
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
        generator=g,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=pin_batches(cfg, torch.device("cpu" if use_cpu() else "cuda")),
    )


def labeled_loaders(trainer, bundle, labeled_idx, view, batch_size: int, extra=None, ratio: float = 0.5) -> list:
    """The loaders of a labeled batch: the real labeled images, and with ``extra`` (synthetic or
    pseudo-labeled images) ``round(ratio * batch_size)`` of them in every batch."""
    if extra is None:
        return [trainer.loader(ViewDataset(bundle.train, labeled_idx, view), batch_size, shuffle=True)]
    if extra.num_classes != bundle.num_classes:
        raise DataError(
            f"the extra labeled set has {extra.num_classes} classes, the data set {bundle.num_classes}; "
            "generate it from a model trained on this data set"
        )
    loaders = []
    b_real, b_extra = round((1 - ratio) * batch_size), round(ratio * batch_size)
    # synthetic images may differ in size or mode: convert to the data's channels; the view resizes
    mode = T.Lambda(lambda img: img.convert("L" if bundle.channels == 1 else "RGB"))
    if b_real > 0:
        loaders.append(trainer.loader(ViewDataset(bundle.train, labeled_idx, view), b_real, shuffle=True))
    if b_extra > 0:
        loaders.append(trainer.loader(ViewDataset(extra, np.arange(len(extra)), T.Compose([mode, view])), b_extra, shuffle=True))
    return loaders


def next_labeled(iters) -> tuple[torch.Tensor, torch.Tensor]:
    """One labeled batch: the next batch of each cycled loader, concatenated."""
    parts = [next(it) for it in iters]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cycle(loader):
    """Endless iteration over a (small) labeled loader inside an epoch of the unlabeled one."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def classifier_outputs(cfg: Config, trainer, model, ema, bundle, label_source, labeled_idx: np.ndarray):
    """The files of a classifier folder besides metrics and history: weights + meta and the label
    split (written by ``Trainer.finish`` on the main process)."""

    def write() -> None:
        student = trainer.accelerator.unwrap_model(model)
        save_classifier(trainer.stage_dir, student, ema.module if ema is not None else None, classifier_meta(cfg, bundle))
        save_label_split(trainer.stage_dir / LABEL_SPLIT, labeled_idx, label_source)

    return write

