"""``dpt export-pseudo-labels``: the run's pseudo-labeled training images as an ImageFolder.

Reads ``<run>/stage1/pseudo_labels.csv`` (the pseudo-label stage) and writes
``export.out/<class>/<index>_<file name>`` for every row: symbolic links to the images
(``export.mode=link``) or copies (``copy``), so any tool that reads class folders can train on
them. ``export.min_confidence`` leaves out pseudo-labels below it; ``export.include_labeled``
keeps the given labeled images (confidence 1). ``labels.csv`` beside the class folders lists
``file,source,class,confidence,labeled`` per image. The folder is built aside and swapped in
whole, so an interrupted export leaves the previous one (or none), never half of one.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

from dpt.errors import DPTError
from dpt.generate import class_dirs
from semivit.config.schema import Config
from semivit.files import atomic_path
from semivit.runtime.layout import layout

logger = logging.getLogger("dpt")


def export_dir(cfg: Config) -> Path:
    return Path(cfg.export.out).expanduser() if cfg.export.out else layout(cfg).root / "pseudo_labeled"


def _classes(cfg: Config) -> list[str]:
    from semivit.data.sources import build_data

    return build_data(cfg.data).classes


def run_export(cfg: Config) -> Path:
    ec = cfg.export
    src = layout(cfg).pseudo_labels_csv
    if not src.is_file():
        raise DPTError(
            f"'{src}' does not exist: run the pseudo-label stage first (python -m semivit pseudo-label, or dpt run)"
        )
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "path", "label", "confidence"} <= set(rows[0]):
        raise DPTError(f"'{src}' is not a pseudo-label file (columns index,path,label,confidence): run pseudo-label again")
    classes = _classes(cfg)
    given = _labeled_indices(layout(cfg).label_split)
    folders = class_dirs(classes)
    out = export_dir(cfg)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in folders:
        (tmp / d).mkdir(parents=True, exist_ok=True)
    listed, kept = [], 0
    for r in rows:
        label, conf = int(r["label"]), float(r["confidence"] or 1.0)
        labeled = int(r["index"]) in given
        if labeled and not ec.include_labeled:
            continue
        if not labeled and conf < ec.min_confidence:
            continue
        if not 0 <= label < len(classes):
            raise DPTError(f"'{src}': label {label} outside 0..{len(classes) - 1}; run pseudo-label again")
        source = Path(r["path"])
        if not source.is_file():
            raise DPTError(f"'{src}' names '{source}', which does not exist (the data moved?): run pseudo-label again")
        name = f"{int(r['index']):06d}_{source.name}"
        target = tmp / folders[label] / name
        if ec.mode == "copy":
            shutil.copy2(source, target)
        else:
            os.symlink(source.resolve(), target)
        listed.append([f"{folders[label]}/{name}", str(source), classes[label], f"{conf:.4f}", int(labeled)])
        kept += 1
    with atomic_path(tmp / "labels.csv") as t, open(t, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "source", "class", "confidence", "labeled"])
        w.writerows(listed)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("export: %d of %d images (%s) -> %s", kept, len(rows), ec.mode, out)
    return out


def _labeled_indices(path: Path) -> set[int]:
    """The run's labeled images (``label_split.csv``): they keep their given labels."""
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {int(r["index"]) for r in csv.DictReader(f) if (r.get("index") or "").strip().isdigit()}
