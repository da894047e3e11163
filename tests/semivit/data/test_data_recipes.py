"""The view recipes of data.transforms (small, semivit) and the per-class caps of the data sets."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing as TimmRandomErasing
from torchvision import transforms as T

from semivit.config.schema import DataConfig
from semivit.data.sources import ArraySource, DataBundle, build_data, first_per_class
from semivit.data.views import build_transforms
from semivit.errors import ConfigError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def bundle(channels=3, n=4, size=(40, 50)):
    shape = (n, size[0], size[1], 3) if channels == 3 else (n, *size)
    images = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    src = ArraySource(images, np.arange(n) % 2, ["a", "b"], "toy/train")
    mean, std = IMAGENET if channels == 3 else ((0.45,), (0.226,))
    return DataBundle("imagefolder", src, src, channels, mean, std)


def ops(view):
    return [type(t).__name__ for t in view.transforms]


def find(view, cls):
    return [t for t in view.transforms if isinstance(t, cls)]


def semivit(**kw):
    settings = dict(
        name="imagefolder", transforms="semivit", image_size=32, hflip=True, randaug_magnitude=9, random_erasing=0.25
    )
    return DataConfig(**{**settings, **kw})


def test_small_recipe_keeps_its_views_and_pretrains_on_the_weak_one():
    cfg = DataConfig(name="digits", image_size=28)
    tf = build_transforms(cfg, bundle(channels=1))
    assert set(tf) == {"train", "weak", "strong", "test", "pretrain"}
    assert tf["train"] is tf["strong"] and tf["pretrain"] is tf["weak"]
    assert ops(tf["weak"]) == ["Resize", "CenterCrop", "RandomCrop", "ToTensor", "Normalize"]
    assert ops(tf["strong"]) == [
        "Resize",
        "CenterCrop",
        "RandomCrop",
        "RandAugment",
        "ToTensor",
        "Normalize",
        "RandomErasing",
    ]
    ra = find(tf["strong"], T.RandAugment)[0]
    assert (ra.num_ops, ra.magnitude) == (2, 10)
    assert ops(tf["test"]) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]


def test_semivit_views_follow_the_published_recipe():
    tf = build_transforms(semivit(), bundle())
    assert set(tf) == {"train", "weak", "strong", "test", "pretrain"}
    for key in ("train", "strong"):
        crop = tf[key].transforms[0]
        assert type(crop).__name__ == "RandomResizedCropAndInterpolation" and crop.scale == (0.08, 1.0)
        assert "bicubic" in repr(crop)
        assert find(tf[key], T.RandomHorizontalFlip)[0].p == 0.5
        (ra,) = find(tf[key], RandAugment)
        assert ra.num_layers == 2 and {(op.magnitude, op.magnitude_std) for op in ra.ops} == {(9, 0.5)}
        (erase,) = find(tf[key], TimmRandomErasing)
        assert (erase.probability, erase.mode) == (0.25, "pixel")
        assert not find(tf[key], T.ColorJitter)  # timm drops the jitter where RandAugment runs
    weak = tf["weak"]
    assert find(weak, T.ColorJitter)[0].brightness == (0.6, 1.4)
    assert not find(weak, RandAugment) and not find(weak, TimmRandomErasing)
    pre = tf["pretrain"].transforms[0]
    assert isinstance(pre, T.RandomResizedCrop) and pre.scale == (0.2, 1.0)
    assert pre.interpolation == T.InterpolationMode.BICUBIC
    assert ops(tf["test"]) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert tf["test"].transforms[0].size == 36  # int(32 / 0.875)
    assert tf["test"].transforms[0].interpolation == T.InterpolationMode.BICUBIC


def test_semivit_evaluation_resizes_224_from_256_and_crops_larger_inputs_whole():
    assert build_transforms(semivit(image_size=224), bundle())["test"].transforms[0].size == 256
    assert build_transforms(semivit(image_size=384), bundle())["test"].transforms[0].size == 384


def test_semivit_views_read_the_augmentation_settings():
    tf = build_transforms(semivit(hflip=False, randaug_magnitude=5, random_erasing=0.0), bundle())
    for view in tf.values():
        assert not find(view, T.RandomHorizontalFlip)
    assert {op.magnitude for op in find(tf["strong"], RandAugment)[0].ops} == {5}
    assert not find(tf["strong"], TimmRandomErasing)
    tf = build_transforms(semivit(randaug_num_ops=0), bundle())
    assert not find(tf["strong"], RandAugment)
    # without RandAugment the published semi-stage views jitter colours, fine-tuning does not
    assert find(tf["strong"], T.ColorJitter) and not find(tf["train"], T.ColorJitter)


@pytest.mark.parametrize("channels", [3, 1])
def test_semivit_views_make_tensors_of_the_input_size(channels):
    b = bundle(channels=channels)
    tf = build_transforms(semivit(image_size=24), b)
    torch.manual_seed(0)
    for name, view in tf.items():
        for i in range(4):
            assert view(b.train.load(i)).shape == (channels, 24, 24), name


def test_posterize_at_magnitude_10_gives_a_black_image_instead_of_failing():
    # timm asks Pillow for 0 bits at magnitude 10; Pillow >= 10 refuses, which would stop training
    tf = build_transforms(semivit(randaug_magnitude=10), bundle())
    (ra,) = find(tf["strong"], RandAugment)
    (op,) = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude_std = 1.0, 0.0
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert np.asarray(out).max() == 0


def test_unknown_recipe_and_magnitudes_off_scale_are_errors():
    with pytest.raises(ConfigError, match=r"data.transforms' must be one of small, semivit \(got 'imagenet'\)"):
        build_transforms(DataConfig(transforms="imagenet"), bundle())
    with pytest.raises(ConfigError, match=r"randaug_magnitude' must be in 0-10 .*\(got 15\)"):
        build_transforms(semivit(randaug_magnitude=15), bundle())
    with pytest.raises(ConfigError, match=r"randaug_magnitude' must be in 0-30 .*\(got 40\)"):
        build_transforms(DataConfig(randaug_magnitude=40), bundle())
    with pytest.raises(ConfigError, match="random_erasing"):
        build_transforms(semivit(random_erasing=1.5), bundle())


def test_first_per_class_keeps_source_order():
    targets = np.array([2, 0, 2, 1, 0, 2, 0, 1])
    assert first_per_class(targets, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert first_per_class(targets, 1).tolist() == [0, 1, 3]
    assert first_per_class(targets, 9).tolist() == list(range(8))


def test_per_class_caps_of_an_array_data_set_compose_with_max_train():
    full = build_data(DataConfig(name="digits"))
    b = build_data(DataConfig(name="digits", max_train_per_class=3, max_test_per_class=2))
    assert b.classes == full.classes
    assert np.bincount(b.train.targets).tolist() == [3] * 10 and np.bincount(b.test.targets).tolist() == [2] * 10
    first = [i for i, t in enumerate(full.train.targets) if t == 4][:3]
    assert [p for p, t in zip(b.train.paths, b.train.targets, strict=True) if t == 4] == [
        full.train.paths[i] for i in first
    ]
    assert np.array_equal(
        b.train.load(0), full.train.load(int(np.flatnonzero(full.train.targets == b.train.targets[0])[0]))
    )
    both = build_data(DataConfig(name="digits", max_train_per_class=3, max_train=12))
    assert both.train.paths == b.train.paths[:12] and both.num_classes == 10


def test_per_class_caps_of_a_folder_data_set(tmp_path):
    for split, n in (("train", 5), ("val", 3)):
        for c in ("b", "a"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 6)).save(tmp_path / split / c / f"{i}.png")
    b = build_data(DataConfig(name="imagefolder", root=str(tmp_path), max_train_per_class=2, max_test_per_class=1))
    assert b.classes == ["a", "b"]
    assert [p.split("/")[-2:] for p in b.train.paths] == [
        ["a", "0.png"],
        ["a", "1.png"],
        ["b", "0.png"],
        ["b", "1.png"],
    ]
    assert b.train.targets.tolist() == [0, 0, 1, 1] and b.test.targets.tolist() == [0, 1]
    assert b.train.load(3).size == (6, 6)
