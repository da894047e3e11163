"""Stage 3 of DPT: the classifier retrained on the real labeled images plus extra labeled ones.

``retrain.mode``: ``semi`` (Semi-ViT again; the unlabeled set stays the real training images),
``supervised`` (fine-tuning without unlabeled images) or ``probe`` (DPT's protocol: a logistic
regression on frozen features, ``dpt.probe``). ``retrain.source`` names the extra images: the
generator's (``synthetic``), K real unlabeled images per class with their stage-1 pseudo-labels
(``pseudo-real``, the self-training control), the same with their true labels (``real``, the
oracle) or none (K = 0). ``retrain.filter_conf`` keeps an extra image only when the stage-1
classifier gives its label at least that probability. In semi and supervised mode the extra images
fill ``retrain.synthetic_ratio`` of every labeled batch and the number of optimizer steps is that of
the K = 0 control. With ``retrain.synthetic_only`` the classifier learns from the extra images
alone, which measures the generator (Classification Accuracy Score).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dpt.errors import DPTError
from semivit.config.schema import Config
from semivit.data.sources import ImageSource, build_data
from semivit.errors import ConfigError
from semivit.runtime.layout import MANIFEST, layout

logger = logging.getLogger("dpt")


def stage3_dir(cfg: Config) -> Path:
    return layout(cfg).stage3


def resolve_init(cfg: Config) -> str:
    """``retrain.init``: stage1 (the Semi-ViT model of this run), stage0 (the MAE encoder: the run's own,
    or the file model.init names) or a path."""
    init = cfg.retrain.init
    if init == "stage1":
        path = layout(cfg).semi
        hint = "run stage 1 first (scripts/stage1_semivit.sh) or set retrain.init=stage0|PATH"
    elif init == "stage0":
        # a run whose classifiers start from a given encoder (model.init=PATH) has that as its stage 0
        given = cfg.model.init not in ("", "auto", "none")
        path = Path(cfg.model.init) if given else layout(cfg).encoder
        hint = "run stage 0 first (python -m semivit pretrain) or set retrain.init=stage1|PATH"
    else:
        path, hint = Path(init), "set retrain.init=stage0|stage1|PATH to an existing folder or file"
    if not path.exists():
        raise ConfigError(f"retrain.init='{init}': '{path}' does not exist; {hint}")
    return str(path)


def check_init_classes(init: str, classes: list[str], cfg: Config) -> None:
    from dpt.errors import DPTClassMismatchError
    from semivit.stages.class_checks import check_classifier_classes

    check_classifier_classes(
        init, classes, cfg.data, "retrain.init classifier",
        "start from a classifier of this data set (retrain.init=stage1|stage0|PATH)", error=DPTClassMismatchError,
    )


def synthetic_dir(cfg: Config) -> Path:
    return Path(cfg.retrain.synthetic) if cfg.retrain.synthetic else layout(cfg).synthetic


def _check_manifest(folder: Path) -> None:
    if not (folder / MANIFEST).is_file():
        raise ConfigError(
            f"retrain.synthetic='{folder}' holds no manifest.csv; run `python -m dpt generate` first "
            "or point retrain.synthetic at a generated data set"
        )


def per_class_draw(
    labels: np.ndarray, keep: np.ndarray, per_class: int, seed: int, what: str, strict: bool, num_classes: int = 0
) -> np.ndarray:
    """Indices (ascending within each class) of ``per_class`` images of each class among those
    ``keep`` allows, drawn with ``seed`` (0: all of them). A class with fewer is an error when
    ``strict`` (a generated set that is simply too small), else it gives what it has and the log
    says which classes fell short (a filter, or pseudo-labels that favour some classes)."""
    if per_class <= 0:
        return np.flatnonzero(keep)
    rng = np.random.default_rng(seed)
    chosen, short = [], []
    classes = np.unique(labels) if strict else np.arange(max(num_classes, int(labels.max(initial=-1)) + 1))
    for c in classes:
        idx = np.flatnonzero((labels == c) & keep)
        if len(idx) < per_class:
            if strict:
                raise DPTError(
                    f"{what} has {len(idx)} images of class {c}, fewer than the {per_class} asked for "
                    "(retrain.synthetic_per_class); generate more or ask for fewer"
                )
            short.append(f"{c}: {len(idx)}")
            chosen.append(idx)
            continue
        chosen.append(np.sort(rng.choice(idx, size=per_class, replace=False)))
    if short:
        logger.warning("%s: fewer than %d images left in classes %s", what, per_class, ", ".join(short))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def stage1_confidence(cfg: Config, bundle, source: ImageSource) -> np.ndarray:
    """The probability the stage-1 classifier (the one that made the pseudo-labels) gives each
    image's label."""
    import torch

    from semivit.data.views import ViewDataset, build_transforms
    from semivit.models.classifier import load_classifier
    from semivit.runtime.accelerator import make_accelerator
    from semivit.stages.common import make_loader
    from semivit.stages.evaluate import predict

    folder = layout(cfg).semi
    if not (folder / "meta.json").is_file():
        raise ConfigError(f"retrain.filter_conf needs the stage-1 classifier '{folder}': run stage 1 first or set retrain.filter_conf=0")
    accelerator = make_accelerator(cfg, layout(cfg).stage3)
    model, _ = load_classifier(folder, prefer_ema=cfg.pseudo_label.use_ema)
    mode = "L" if bundle.channels == 1 else "RGB"
    tf = build_transforms(cfg.data, bundle)["test"]
    ds = ViewDataset(source, np.arange(len(source)), lambda img: tf(img.convert(mode)))
    loader = accelerator.prepare(make_loader(ds, cfg.pseudo_label.batch_size, shuffle=False, cfg=cfg, drop_last=False))
    logits, labels, index = predict(accelerator.prepare(model), loader, accelerator, "filter: stage-1 confidence")
    probs = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    conf = torch.zeros(len(source))
    conf[index] = probs
    return conf.numpy()


def extra_images(cfg: Config, bundle, unlabeled: np.ndarray) -> tuple[ImageSource | None, dict]:
    """The extra labeled images of stage 3 (``retrain.source``) and a summary of them."""
    from dpt.generate import load_synthetic_source
    from dpt.train_diffusion import read_labels_csv
    from semivit.data.sources import take

    rc = cfg.retrain
    info: dict = {"source": rc.source, "filter_conf": rc.filter_conf}
    if rc.source == "none":
        return None, {**info, "num_extra": 0}
    K = rc.synthetic_per_class
    pseudo_conf = None  # the pseudo-labels' confidences (pseudo-real)
    if rc.source == "synthetic":
        folder = synthetic_dir(cfg)
        _check_manifest(folder)
        pool = load_synthetic_source(folder, bundle.classes, bundle.channels)
        labels, true = pool.targets, None
        what = f"'{folder}'"
    else:
        labels_csv = layout(cfg).pseudo_labels_csv
        if rc.source == "pseudo-real":
            if not labels_csv.is_file():
                raise ConfigError(
                    f"retrain.source=pseudo-real reads '{labels_csv}', which does not exist: run the pseudo-label "
                    "stage first (python -m semivit pseudo-label)"
                )
            idx, lab, conf = read_labels_csv(labels_csv, bundle.train)
            table = np.full(len(bundle.train), -1, dtype=np.int64)
            table[idx] = lab
            labels = table[unlabeled]
            if (labels < 0).any():
                raise ConfigError(f"'{labels_csv}' has no label for {int((labels < 0).sum())} unlabeled images: run pseudo-label again")
            if conf is not None:
                conf_table = np.ones(len(bundle.train))
                conf_table[idx] = conf
                pseudo_conf = conf_table[unlabeled]
        else:
            labels = bundle.train.targets[unlabeled]
            if (labels < 0).any():
                raise ConfigError(
                    "retrain.source=real needs the true labels of the unlabeled images, which this data set does not "
                    "have (hidden by the split, or your own unlabeled images): use retrain.source=pseudo-real or synthetic"
                )
        true = bundle.train.targets[unlabeled]
        pool = None
        what = f"the {len(unlabeled)} unlabeled training images"
    keep = np.ones(len(labels), dtype=bool)
    if rc.filter_conf > 0:
        conf = pseudo_conf if rc.source == "pseudo-real" else stage1_confidence(cfg, bundle, pool)
        if conf is None:
            raise ConfigError(f"retrain.filter_conf needs confidences; '{layout(cfg).pseudo_labels_csv}' has none")
        keep = conf >= rc.filter_conf
        info["filter_kept"] = round(float(keep.mean()), 4)
    strict = rc.source in ("synthetic", "real") and rc.filter_conf <= 0
    chosen = per_class_draw(labels, keep, K, cfg.seed, what, strict=strict, num_classes=bundle.num_classes)
    if len(chosen) == 0:
        raise ConfigError(f"no extra images left from {what} (retrain.filter_conf={rc.filter_conf}); lower it")
    if pool is not None:
        extra = take(pool, chosen)
    else:
        extra = take(bundle.train, unlabeled[chosen])
        extra.targets = labels[chosen].copy()  # the pseudo-labels (or the true ones), not the source's
        known = true[chosen] >= 0
        if rc.source == "pseudo-real" and known.any():
            info["extra_label_acc"] = 100.0 * float(np.mean(labels[chosen][known] == true[chosen][known]))
    info.update(num_extra=int(len(extra)), extra_per_class=np.bincount(extra.targets, minlength=bundle.num_classes).tolist())
    return extra, info


def run_retrain(cfg: Config, out_dir: Path | None = None) -> Path:
    """Stage 3 in the mode and with the extra images the ``retrain`` settings name."""
    from semivit.data.run_split import run_split
    from semivit.stages.finetune import run_finetune
    from semivit.stages.semi import run_semi

    rc = cfg.retrain
    if rc.source == "synthetic":
        _check_manifest(synthetic_dir(cfg))  # before any data is read
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    init = resolve_init(cfg)
    out = Path(out_dir) if out_dir else stage3_dir(cfg)
    check_init_classes(init, bundle.classes, cfg)
    split = run_split(cfg, bundle.train, "retrain")
    extra, info = extra_images(cfg, bundle, split.unlabeled)
    logger.info(
        "stage 3 (%s): %s, init %s", rc.mode,
        "no extra images" if extra is None else f"{len(extra)} extra images ({rc.source})", init,
    )
    if rc.mode == "probe":
        from dpt.probe import run_probe

        return run_probe(cfg, bundle, out, init, split.labeled, extra, info)
    info = {"mode": rc.mode, **info}
    if rc.synthetic_only:
        # Classification Accuracy Score: a classifier that never saw a real label
        return run_finetune(cfg, out_dir=out, init=init, labeled=(extra, np.arange(len(extra))), info=info)
    if rc.mode == "supervised":
        return run_finetune(cfg, out_dir=out, init=init, extra=extra, extra_ratio=rc.synthetic_ratio, info=info)
    return run_semi(cfg, out_dir=out, init=init, synthetic=extra, synthetic_ratio=rc.synthetic_ratio, info=info)
