"""Stage 1c: the EMA teacher labels the training images.

``<output_dir>/stage1/pseudo_labels.csv`` has one row per training image, columns
``index,path,label,class_name,confidence,top5_labels,top5_confidences,true_label``: unlabeled images
carry the teacher's label and confidence, the labeled subset its given label with confidence 1.0,
so stage 2 reads one file for every training image. ``top5_*`` are the teacher's five most likely
classes with their probabilities (space-separated, for every row); ``true_label`` is empty where
the true label is unknown (target -1). ``pseudo_labels.json`` summarises the unlabeled rows (count
per class, mean confidence, accuracy against the true labels where known).

Memory per rank does not grow with the data set: each rank labels one contiguous share of the
images and writes its rows to its own part file (``stage1/.pseudo_labels.part<r>of<w>.csv``) as it
goes; rank 0 then concatenates the parts in rank order into the CSV, line by line, and counts the
summary on the way. No logits are gathered.
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

logger = logging.getLogger("semivit")

COLUMNS = ["index", "path", "label", "class_name", "confidence", "top5_labels", "top5_confidences", "true_label"]


def run_pseudo_label(cfg: Config, checkpoint: str | None = None) -> Path:
    folder = Path(checkpoint or cfg.checkpoint or layout(cfg).semi)
    if not (folder / META).is_file():
        raise FileNotFoundError(
            f"pseudo-label needs a trained classifier folder, '{folder}' has no meta.json: run `semivit semi` with "
            "the same output_dir first, or set checkpoint=FOLDER"
        )
    out_dir = layout(cfg).stage1
    meta = read_classifier_meta(folder)
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    check_same_classes(
        meta["classes"], f"classifier '{folder}'", bundle.classes, data_description(cfg.data),
        "label the data set it was trained on (data.name / data.root), or set checkpoint=FOLDER",
    )
    accelerator = make_accelerator(cfg, out_dir)
    model, meta = load_classifier(folder, prefer_ema=cfg.pseudo_label.use_ema)
    # the run's labeled subset, so its rows keep their given labels
    labeled = run_split(cfg, bundle.train, "pseudo-label").labeled
    _warn_other_split(folder, labeled)
    is_labeled = np.zeros(len(bundle.train), dtype=bool)
    is_labeled[np.asarray(labeled, dtype=np.int64)] = True
    rank, world = accelerator.process_index, accelerator.num_processes
    share = np.array_split(np.arange(len(bundle.train)), world)[rank]
    tf = build_transforms(cfg.data, bundle)["test"]
    loader = make_loader(ViewDataset(bundle.train, share, tf), cfg.pseudo_label.batch_size, shuffle=False, cfg=cfg,
                         drop_last=False)
    model = model.to(accelerator.device).eval()
    csv_path = layout(cfg).pseudo_labels_csv
    part = part_path(csv_path, rank, world)
    label_share(model, loader, accelerator, bundle.train, is_labeled, part)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [part_path(csv_path, r, world) for r in range(world)]
        summary = merge_parts(parts, csv_path, is_labeled, bundle.classes)
        summary.update(checkpoint=str(folder), num_labeled=int(is_labeled.sum()), use_ema=cfg.pseudo_label.use_ema)
        atomic_write_json(layout(cfg).pseudo_labels_json, summary)
        for p in parts:
            p.unlink(missing_ok=True)
        logger.info(
            "pseudo-labels: %d unlabeled images, accuracy %s, mean confidence %.3f -> %s",
            summary["num_unlabeled"], summary.get("accuracy"), summary["mean_confidence"], csv_path,
        )
    accelerator.wait_for_everyone()
    return csv_path


def part_path(csv_path: Path, rank: int, world: int) -> Path:
    return csv_path.with_name(f".{csv_path.stem}.part{rank}of{world}.csv")


@torch.no_grad()
def label_share(model, loader, accelerator, source, is_labeled: np.ndarray, part: Path) -> None:
    """This rank's rows, written batch by batch to its part file (no header)."""
    from tqdm.auto import tqdm

    classes = source.classes
    k5 = min(5, len(classes))
    with atomic_path(part) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        for images, true, index in tqdm(loader, desc="pseudo-label", leave=False,
                                         disable=not accelerator.is_local_main_process):
            with accelerator.autocast():
                logits = model(images.to(accelerator.device))
            probs = logits.float().softmax(dim=1).cpu()
            top_p, top_i = probs.topk(k5, dim=1)
            for i, t, ids, ps in zip(index.tolist(), true.tolist(), top_i.tolist(), top_p.tolist(), strict=True):
                y, p = (int(source.targets[i]), 1.0) if is_labeled[i] else (ids[0], ps[0])
                w.writerow([i, source.paths[i], y, classes[y], f"{p:.4f}", " ".join(map(str, ids)),
                            " ".join(f"{q:.4f}" for q in ps), t if t >= 0 else ""])


def merge_parts(parts: list[Path], csv_path: Path, is_labeled: np.ndarray, classes: list[str]) -> dict:
    """The parts, in rank order, into one CSV under a temporary name (renamed when complete), and
    the summary of the unlabeled rows, counted from the rows one at a time."""
    counts = np.zeros(len(classes), dtype=np.int64)
    conf_sum, num_unlabeled, correct, known, rows = 0.0, 0, 0, 0, 0
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(COLUMNS)
        for part in parts:
            with open(part, newline="") as f:
                for row in csv.reader(f):
                    i = int(row[0])
                    if i != rows:
                        raise RuntimeError(f"pseudo-label part '{part}' has row {i} where {rows} was due")
                    w.writerow(row)
                    rows += 1
                    if is_labeled[i]:
                        continue
                    label = int(row[2])
                    counts[label] += 1
                    conf_sum += float(row[4])
                    num_unlabeled += 1
                    if row[-1] != "":
                        known += 1
                        correct += int(row[-1]) == label
        if rows != len(is_labeled):
            raise RuntimeError(f"pseudo-label parts hold {rows} rows for {len(is_labeled)} images")
    out = {
        "num_unlabeled": num_unlabeled,
        "count_per_class": dict(zip(classes, counts.tolist(), strict=True)),
        "mean_confidence": conf_sum / num_unlabeled if num_unlabeled else 0.0,
    }
    if known:
        out["accuracy"] = 100 * correct / known
        out["num_with_true_label"] = known
    return out


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
