"""User data on disk (ImageFolder layout) and the file-safety helpers every stage writes through."""

import numpy as np
import pytest
import torch
from PIL import Image

from semivit.config import DataConfig
from semivit.data import DataError, build_data, build_transforms, make_split
from semivit.io import atomic_path, atomic_write_json, load_weights, read_json, save_weights


def make_folder(root, classes=("cat", "dog", "eel"), n=4, size=(20, 14), mode="RGB", split="val"):
    rng = np.random.default_rng(0)
    for sub in ("train", split):
        for c in classes:
            d = root / sub / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(d / f"{i}.png")
    return root


def test_imagefolder_any_size_grayscale_to_rgb_and_test_split(tmp_path):
    root = make_folder(tmp_path / "d", mode="L", split="test")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, labels_per_class=2)
    bundle = build_data(cfg)
    assert bundle.classes == ["cat", "dog", "eel"]
    assert bundle.channels == 3 and len(bundle.train) == 12 and len(bundle.test) == 12
    tf = build_transforms(cfg, bundle)
    x = tf["strong"](bundle.train.load(0))
    assert x.shape == (3, 16, 16)
    split = make_split(cfg, bundle.train, seed=1)
    assert len(split.labeled) == 6 and len(np.intersect1d(split.labeled, split.unlabeled)) == 0


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="train"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    root = make_folder(tmp_path / "d")
    (root / "train" / "fox").mkdir()  # an empty class folder
    with pytest.raises(DataError, match="fox"):
        build_data(DataConfig(name="imagefolder", root=str(root)))
    (root / "train" / "fox").rmdir()
    bad = root / "train" / "cat" / "9.png"
    bad.write_bytes(b"not an image")
    bundle = build_data(DataConfig(name="imagefolder", root=str(root)))
    index = bundle.train.paths.index(str(bad))
    with pytest.raises(DataError, match="9.png"):
        bundle.train.load(index)


def test_too_few_images_for_the_labels_asked(tmp_path):
    root = make_folder(tmp_path / "d", n=3)
    cfg = DataConfig(name="imagefolder", root=str(root), labels_per_class=5)
    bundle = build_data(cfg)
    with pytest.raises(DataError, match="labels_per_class"):
        make_split(cfg, bundle.train, seed=0)


def test_cifar_without_files_says_where_they_go(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"top1": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("interrupted")
    assert read_json(target) == {"top1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_weights_round_trip_and_unsafe_pickle_refused(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_weights(state, tmp_path / "m.safetensors")
    assert torch.equal(load_weights(tmp_path / "m.safetensors")["w"], state["w"])

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_weights(tmp_path / "evil.pt")
