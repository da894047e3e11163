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

from semivit.checks import check_classifier_classes
from semivit.config import Config
from semivit.data import save_label_split
from semivit.layout import LABEL_SPLIT, layout
from semivit.loop import StopRequested, seed_worker  # noqa: F401  (StopRequested: the CLIs catch it here)
from semivit.models import classifier_meta, create_classifier, load_encoder_weights, save_classifier

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
    )


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

