"""The views each stage trains on (recipes ``small`` and ``semivit``: weak, strong, labeled,
test, pre-training) and the data sets that apply them to an :class:`~semivit.data.sources.ImageSource`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

from semivit.config.schema import DataConfig, validate_data
from semivit.data.sources import DataBundle, ImageSource
from semivit.errors import DataError


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
    validate_data(cfg)
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
