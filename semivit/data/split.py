"""The labeled subset of the training images: drawn per class (or by percent) from one seed,
written as ``label_split.csv`` and read back with checks that the files and labels still match.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semivit.config.schema import DataConfig
from semivit.data.sources import ImageSource, examples
from semivit.errors import DataError

logger = logging.getLogger(__name__)


def draw_label_split(
    targets: np.ndarray, num_classes: int, seed: int, per_class: int = 0, percent: float = 0.0, classes=None
) -> np.ndarray:
    """Indices of the labeled subset: ``per_class`` images of each class, or ``percent`` % of each
    class (at least one). Depends only on ``seed``, so every rank draws the same split."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        n = max(1, int(round(len(idx) * percent / 100.0))) if percent > 0 else per_class
        if n > len(idx):
            name = classes[c] if classes else c
            asked = (
                f"data.label_percent={percent} asks for {n}"
                if percent > 0
                else f"data.labels_per_class={n} asks for {n}"
            )
            raise DataError(
                f"class '{name}' has {len(idx)} training images but {asked} labeled ones; lower "
                f"data.labels_per_class, use data.label_percent, or keep more images of the class "
                f"(data.max_train and data.max_train_per_class keep only the first images)"
            )
        chosen.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def save_label_split(path: str | Path, indices: np.ndarray, source: ImageSource) -> None:
    from semivit.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label"])
        for i in indices:
            w.writerow([int(i), source.paths[i], int(source.targets[i])])


def _read_split_rows(path: Path) -> list[dict]:
    """Rows of a split CSV; a row with fewer or more fields than the header is an error."""
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"label split file '{path}' (data.label_csv) is not a readable CSV text file: {e}") from e
    for line, r in enumerate(rows, start=2):
        if None in r or None in r.values():  # DictReader's marks for extra / missing fields
            raise DataError(
                f"label split file '{path}', row {line}: {'more' if None in r else 'fewer'} fields than the "
                f"header {[k for k in r if k is not None]}; quote paths that hold commas"
            )
    return rows


def _int_column(path: Path, rows: list[dict], key: str) -> np.ndarray:
    try:
        return np.array([int(r[key].strip()) for r in rows], dtype=np.int64)
    except ValueError as e:
        raise DataError(f"label split file '{path}': column '{key}' must hold whole numbers ({e})") from e


def _path_tail(p: str) -> tuple:
    return Path(p).parts[-2:]  # class folder and file name


def _check_split_paths(path: Path, rows: list[dict], idx: np.ndarray, source: ImageSource) -> None:
    """The ``path`` column must name the images the indices point at. The same class/file names under
    another folder mean the data set moved (another machine, a relative data.root): allowed."""
    wrong = [
        (r["path"], source.paths[i])
        for r, i in zip(rows, idx, strict=True)
        if r["path"] and r["path"] != source.paths[i]
    ]
    if not wrong:
        return
    if all(_path_tail(a) == _path_tail(b) for a, b in wrong):
        logger.warning(
            "label split file '%s' names the images under another folder (e.g. '%s', now '%s'); the class and "
            "file names match, so it is used",
            path,
            wrong[0][0],
            wrong[0][1],
        )
        return
    raise DataError(
        f"label split file '{path}': {len(wrong)} paths differ from the data set at the same index "
        f"(e.g. '{wrong[0][0]}', the data set has '{wrong[0][1]}'); the data set changed since the split "
        "was written: draw a new split or restore the data set"
    )


def _check_split_labels(path: Path, rows: list[dict], idx: np.ndarray, source: ImageSource) -> None:
    given = [(k, r["label"]) for k, r in enumerate(rows) if r["label"].strip()]
    if not given:
        return
    labels = _int_column(path, [{"label": v} for _, v in given], "label")
    at = idx[[k for k, _ in given]]
    bad = np.flatnonzero(labels != source.targets[at])
    if len(bad):
        k = bad[0]
        raise DataError(
            f"label split file '{path}': {len(bad)} labels differ from the data set's (e.g. index {at[k]}: "
            f"file {labels[k]}, data set {source.targets[at[k]]}); the class list changed (class folders added "
            "or renamed?) or the file belongs to another data set"
        )


def load_label_split(path: str | Path, source: ImageSource) -> np.ndarray:
    """Read a split CSV (``index`` column, or Semi-ViT's ``Index``); indices must fit the source,
    appear once, and agree with the optional ``path`` and ``label`` columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"label split file '{path}' (data.label_csv) not found")
    rows = _read_split_rows(path)
    if not rows:
        raise DataError(f"label split file '{path}' (data.label_csv) has no rows: it lists no labeled image")
    key = "index" if "index" in rows[0] else "Index" if "Index" in rows[0] else None
    if key is None:
        raise DataError(f"label split file '{path}' needs a column 'index' (or 'Index'); found {list(rows[0])}")
    idx = _int_column(path, rows, key)
    bad = idx[(idx < 0) | (idx >= len(source))]
    if len(bad):
        raise DataError(
            f"label split file '{path}' has indices out of range [0, {len(source)}): e.g. {bad[:5].tolist()}; "
            "it was made for another data set (or for other data.max_train / max_train_per_class)"
        )
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise DataError(
            f"label split file '{path}' lists {len(dup)} indices more than once (e.g. {dup[:5].tolist()}); "
            "each labeled image must appear once"
        )
    if "path" in rows[0]:
        _check_split_paths(path, rows, idx, source)
    if "label" in rows[0]:
        _check_split_labels(path, rows, idx, source)
    return values


@dataclass
class Split:
    labeled: np.ndarray
    unlabeled: np.ndarray


def _warn_unused_label_settings(cfg: DataConfig) -> None:
    if cfg.label_csv and cfg.label_percent > 0:
        logger.warning("data.label_csv is used; data.label_percent=%s is ignored", cfg.label_percent)
    elif not cfg.label_csv and cfg.label_percent > 0 and cfg.labels_per_class > 0:
        logger.warning(
            "data.label_percent=%s is used; data.labels_per_class=%d is ignored (set one of them to 0)",
            cfg.label_percent,
            cfg.labels_per_class,
        )


def make_split(cfg: DataConfig, source: ImageSource, seed: int) -> Split:
    """The split the data settings ask for, drawn now (``data.label_csv``, else a per-class draw).
    The stages of a run read theirs from the run's file instead (``semivit.data.run_split.run_split``)."""
    return split_with(cfg, source, draw_labeled(cfg, source, seed))


def draw_labeled(cfg: DataConfig, source: ImageSource, seed: int) -> np.ndarray:
    """Indices of the labeled subset: those of ``data.label_csv``, else a draw that depends only on
    the seed and the labels, so it is the same on every rank and in every stage."""
    if source.given_labels:
        # the data set says which images are labeled: they are the labeled set, nothing is drawn
        if cfg.label_csv or cfg.label_percent > 0:
            logger.warning(
                "the data set gives its labeled images (labeled/ or data.labeled_csv): data.label_csv and "
                "data.label_percent are not used"
            )
        return np.flatnonzero(source.targets >= 0)
    _warn_unused_label_settings(cfg)
    if cfg.label_csv:
        return load_label_split(cfg.label_csv, source)
    return draw_label_split(
        source.targets, source.num_classes, seed, cfg.labels_per_class, cfg.label_percent, source.classes
    )


def split_with(cfg: DataConfig, source: ImageSource, labeled: np.ndarray) -> Split:
    """The split around a given labeled subset: the unlabeled images are the others (or all of
    them, ``data.unlabeled_includes_labeled``)."""
    unlabeled_classes = np.setdiff1d(np.arange(source.num_classes), source.targets[labeled])
    if len(unlabeled_classes):
        logger.warning(
            "the labeled split has no image of %d of %d classes (%s): the classifier learns them from "
            "pseudo-labels alone",
            len(unlabeled_classes),
            source.num_classes,
            examples([source.classes[c] for c in unlabeled_classes]),
        )
    if cfg.unlabeled_includes_labeled:
        unlabeled = np.arange(len(source))
    elif source.given_labels:
        unlabeled = np.flatnonzero(source.targets < 0)
    else:
        unlabeled = np.setdiff1d(np.arange(len(source)), labeled)
    return Split(labeled, unlabeled)
