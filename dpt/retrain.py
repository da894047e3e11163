"""Stage 3 of DPT: Semi-ViT again, the labeled set now real labeled + synthetic images.

The unlabeled set stays the real training images; the share of synthetic images in each labeled
batch is ``retrain.synthetic_ratio``. With ``retrain.synthetic_only`` the classifier is trained on
the synthetic set alone (supervised), which measures the generator (Classification Accuracy Score).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from semivit.config import Config, ConfigError
from semivit.data import build_data
from semivit.layout import MANIFEST, layout

logger = logging.getLogger("dpt")


def stage3_dir(cfg: Config) -> Path:
    return layout(cfg).stage3


def resolve_init(cfg: Config) -> str:
    """``retrain.init``: stage1 (the Semi-ViT model of this run), stage0 (the MAE encoder) or a path."""
    init = cfg.retrain.init
    if init == "stage1":
        path = layout(cfg).semi
        hint = "run stage 1 first (scripts/stage1_semivit.sh) or set retrain.init=stage0|PATH"
    elif init == "stage0":
        path = layout(cfg).encoder
        hint = "run stage 0 first (python -m semivit pretrain) or set retrain.init=stage1|PATH"
    else:
        path, hint = Path(init), "set retrain.init=stage0|stage1|PATH to an existing folder or file"
    if not path.exists():
        raise ConfigError(f"retrain.init='{init}': '{path}' does not exist; {hint}")
    return str(path)


def check_init_classes(init: str, classes: list[str], cfg: Config) -> None:
    from dpt.errors import DPTClassMismatchError
    from semivit.checks import check_classifier_classes

    check_classifier_classes(
        init, classes, cfg.data, "retrain.init classifier",
        "start from a classifier of this data set (retrain.init=stage1|stage0|PATH)", error=DPTClassMismatchError,
    )


def synthetic_dir(cfg: Config) -> Path:
    return Path(cfg.retrain.synthetic) if cfg.retrain.synthetic else layout(cfg).synthetic


def run_retrain(cfg: Config, out_dir: Path | None = None) -> Path:
    from dpt.generate import load_synthetic_source
    from semivit.finetune import run_finetune
    from semivit.semi import run_semi

    folder = synthetic_dir(cfg)
    if not (folder / MANIFEST).is_file():
        raise ConfigError(
            f"retrain.synthetic='{folder}' holds no manifest.csv; run `python -m dpt generate` first "
            "or point retrain.synthetic at a generated data set"
        )
    bundle = build_data(cfg.data)
    init = resolve_init(cfg)
    out = Path(out_dir) if out_dir else stage3_dir(cfg)
    if not cfg.retrain.synthetic_only and not 0.0 < cfg.retrain.synthetic_ratio < 1.0:
        raise ConfigError(
            f"retrain.synthetic_ratio={cfg.retrain.synthetic_ratio} must lie in (0, 1): the share of synthetic "
            "images in each labeled batch (retrain.synthetic_only=true trains on synthetic images alone)"
        )
    check_init_classes(init, bundle.classes, cfg)
    synthetic = load_synthetic_source(
        folder, bundle.classes, bundle.channels, per_class=cfg.retrain.synthetic_per_class, seed=cfg.seed
    )
    logger.info("stage 3: %d synthetic images from %s, init %s", len(synthetic), folder, init)
    if cfg.retrain.synthetic_only:
        # Classification Accuracy Score: a classifier that never saw a real label
        cas_cfg = copy.deepcopy(cfg)
        return run_finetune(cas_cfg, out_dir=out, init=init, labeled=(synthetic, np.arange(len(synthetic))))
    return run_semi(cfg, out_dir=out, init=init, synthetic=synthetic, synthetic_ratio=cfg.retrain.synthetic_ratio)
