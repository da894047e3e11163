"""``semivit predict``: a trained classifier (any stage's folder) labels new images into a CSV.

``predict.images`` is a folder (any depth; files that are not images are skipped and counted) or a
list file (one path per line, or a CSV with a ``path`` column). Images may have any size, mode or
format: each is resized by the classifier's test view. The CSV has one row per image, in the order
of the listing, whatever the number of processes: ``path,class,confidence,top5`` where ``top5`` is
``class:probability`` pairs joined by ``;``, most probable first.
"""

from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import numpy as np
import torch

from semivit.config.schema import Config
from semivit.data.sources import UNKNOWN, DataBundle, FileSource, list_images, readable_images
from semivit.data.views import ViewDataset, build_transforms
from semivit.errors import ConfigError
from semivit.files import atomic_path
from semivit.models.classifier import load_classifier, read_classifier_meta
from semivit.runtime.accelerator import make_accelerator
from semivit.runtime.layout import META, layout
from semivit.stages.common import make_loader
from semivit.stages.evaluate import predict

logger = logging.getLogger("semivit")

COLUMNS = ["path", "class", "confidence", "top5"]


def predictions_path(cfg: Config, folder: Path) -> Path:
    return Path(cfg.predict.out) if cfg.predict.out else layout(cfg).root / "predictions" / f"{folder.name}.csv"


def run_predict(cfg: Config) -> Path:
    if not cfg.checkpoint:
        raise ConfigError("predict needs checkpoint=FOLDER, a classifier folder (stage1/semi, stage3, ...)")
    folder = Path(cfg.checkpoint).expanduser()
    if folder.is_file():  # a weights file inside a classifier folder
        folder = folder.parent
    if not (folder / META).is_file():
        raise ConfigError(
            f"checkpoint='{cfg.checkpoint}' is not a classifier folder (no {META}): give the output folder of "
            "finetune, semi or retrain (e.g. runs/NAME/stage1/semi)"
        )
    if not cfg.predict.images:
        raise ConfigError("predict needs predict.images=FOLDER_OR_LIST_FILE, the images to label")
    meta = read_classifier_meta(folder)
    paths, _ = list_images(cfg.predict.images, "predict.images")
    paths, bad = readable_images(paths, cfg.data.skip_unreadable, "predict.images")
    if bad:
        logger.warning("predict: %d unreadable images left out (data.skip_unreadable), e.g. '%s'", len(bad), bad[0][0])
    classes = [str(c) for c in meta["classes"]]
    channels = int(meta["channels"])
    source = FileSource(paths, [UNKNOWN] * len(paths), classes, "L" if channels == 1 else "RGB", photos=True)
    mean, std = tuple(meta.get("mean", (0.5,) * channels)), tuple(meta.get("std", (0.5,) * channels))
    view_cfg = copy.deepcopy(cfg.data)
    view_cfg.image_size = int(meta["image_size"])  # the size the classifier was trained at
    bundle = DataBundle("predict", source, source, channels, mean, std)
    tf = build_transforms(view_cfg, bundle)["test"]
    out = predictions_path(cfg, folder)
    accelerator = make_accelerator(cfg, out.parent)
    model, _ = load_classifier(folder, prefer_ema=cfg.predict.use_ema)
    loader = make_loader(ViewDataset(source, np.arange(len(source)), tf), cfg.predict.batch_size, False, cfg, drop_last=False)
    model, loader = accelerator.prepare(model, loader)
    logits, _, index = predict(model, loader, accelerator, "predict")
    order = index.argsort()  # listing order; gather_for_metrics already dropped the padding repeats
    probs = logits[order].softmax(dim=1)
    index = index[order]
    if accelerator.is_main_process:
        write_predictions(out, source.paths, index, probs, classes)
        logger.info("predict: %d images labeled by '%s' -> %s", len(index), folder, out)
    accelerator.wait_for_everyone()
    return out


def write_predictions(path: Path, paths: list[str], index: torch.Tensor, probs: torch.Tensor, classes: list[str]) -> None:
    k = min(5, len(classes))
    top_p, top_c = probs.topk(k, dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i, ps, cs in zip(index.tolist(), top_p.tolist(), top_c.tolist(), strict=True):
            top5 = ";".join(f"{classes[c]}:{p:.4f}" for p, c in zip(ps, cs, strict=True))
            w.writerow([paths[i], classes[cs[0]], f"{ps[0]:.4f}", top5])
