"""Stage 1c: the EMA teacher labels the training images.

``<output_dir>/stage1/pseudo_labels.csv`` has one row per training image, columns
``index,path,label,confidence,true_label``: unlabeled images carry the teacher's label and
confidence, the labeled subset its given label with confidence 1.0, so stage 2 reads one file for
every training image. ``pseudo_labels.json`` summarises the unlabeled rows (count per class, mean
confidence, accuracy against the true labels where known).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from semivit.config.schema import Config
from semivit.data.run_split import run_split
from semivit.data.sources import build_data
from semivit.data.views import ViewDataset, build_transforms
from semivit.files import atomic_path, atomic_write_json
from semivit.models.classifier import load_classifier, read_classifier_meta
from semivit.runtime.accelerator import make_accelerator
from semivit.runtime.layout import LABEL_SPLIT, META, layout
from semivit.stages.class_checks import check_same_classes, data_description
from semivit.stages.common import make_loader
from semivit.stages.evaluate import predict

logger = logging.getLogger("semivit")

COLUMNS = ["index", "path", "label", "confidence", "true_label"]


def run_pseudo_label(cfg: Config, checkpoint: str | None = None) -> Path:
    folder = Path(checkpoint or cfg.checkpoint or layout(cfg).semi)
    if not (folder / META).is_file():
        raise FileNotFoundError(
            f"pseudo-label needs a trained classifier folder, '{folder}' has no meta.json: run `semivit semi` with "
            "the same output_dir first, or set checkpoint=FOLDER"
        )
    out_dir = layout(cfg).stage1
    meta = read_classifier_meta(folder)
    bundle = build_data(cfg.data)
    check_same_classes(
        meta["classes"], f"classifier '{folder}'", bundle.classes, data_description(cfg.data),
        "label the data set it was trained on (data.name / data.root), or set checkpoint=FOLDER",
    )
    accelerator = make_accelerator(cfg, out_dir)
    model, meta = load_classifier(folder, prefer_ema=cfg.pseudo_label.use_ema)
    # the run's labeled subset, so its rows keep their given labels
    labeled = run_split(cfg, bundle.train, "pseudo-label").labeled
    _warn_other_split(folder, labeled)
    tf = build_transforms(cfg.data, bundle)["test"]
    ds = ViewDataset(bundle.train, np.arange(len(bundle.train)), tf)
    loader = make_loader(ds, cfg.pseudo_label.batch_size, shuffle=False, cfg=cfg, drop_last=False)
    model, loader = accelerator.prepare(model, loader)
    logits, true, index = predict(model, loader, accelerator, "pseudo-label")
    probs = logits.softmax(dim=1)
    conf, label = probs.max(dim=1)
    order = index.argsort()  # rows in training-source order, whatever the rank layout
    index, conf, label, true = index[order], conf[order], label[order], true[order]
    is_labeled = torch.zeros(len(bundle.train), dtype=torch.bool)
    is_labeled[torch.as_tensor(labeled)] = True
    csv_path = layout(cfg).pseudo_labels_csv
    if accelerator.is_main_process:
        write_pseudo_labels(csv_path, bundle.train, index, label, conf, true, is_labeled)
        summary = summarize(label[~is_labeled[index]], conf[~is_labeled[index]], true[~is_labeled[index]], bundle.classes)
        summary.update(checkpoint=str(folder), num_labeled=int(is_labeled.sum()), use_ema=cfg.pseudo_label.use_ema)
        atomic_write_json(layout(cfg).pseudo_labels_json, summary)
        logger.info(
            "pseudo-labels: %d unlabeled images, accuracy %s, mean confidence %.3f -> %s",
            summary["num_unlabeled"], summary.get("accuracy"), summary["mean_confidence"], csv_path,
        )
    accelerator.wait_for_everyone()
    return csv_path


def _warn_other_split(folder: Path, labeled: np.ndarray) -> None:
    """``checkpoint=`` may name a classifier of another run: it still labels every image, and the
    run's labeled images keep their given labels, but the mismatch is worth a line in the log."""
    theirs = folder / LABEL_SPLIT
    if not theirs.is_file():
        return
    with open(theirs, newline="") as f:
        seen = {int(r["index"]) for r in csv.DictReader(f) if r.get("index", "").strip().isdigit()}
    if seen != set(labeled.tolist()):
        logger.warning(
            "classifier '%s' was trained on another labeled split ('%s', %d images) than the run's (%d images); "
            "the run's labeled images keep their given labels",
            folder, theirs, len(seen), len(labeled),
        )


def write_pseudo_labels(path, source, index, label, conf, true, is_labeled) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i, y, p, t in zip(index.tolist(), label.tolist(), conf.tolist(), true.tolist(), strict=True):
            if is_labeled[i]:
                y, p = int(source.targets[i]), 1.0
            w.writerow([i, source.paths[i], y, f"{p:.4f}", t if t >= 0 else ""])


def summarize(label: torch.Tensor, conf: torch.Tensor, true: torch.Tensor, classes: list[str]) -> dict:
    counts = torch.bincount(label, minlength=len(classes)).tolist()
    known = true >= 0
    out = {
        "num_unlabeled": int(len(label)),
        "count_per_class": dict(zip(classes, counts, strict=True)),
        "mean_confidence": float(conf.mean()) if len(conf) else 0.0,
    }
    if known.any():
        out["accuracy"] = 100 * float((label[known] == true[known]).float().mean())
        out["num_with_true_label"] = int(known.sum())
    return out
