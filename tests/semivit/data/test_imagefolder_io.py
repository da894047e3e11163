"""User data on disk (ImageFolder layout) and the file-safety helpers every stage writes through."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from semivit.config.schema import DataConfig
from semivit.data.sources import ArraySource, build_data
from semivit.data.split import load_label_split, make_split
from semivit.data.views import TwoViewDataset, build_transforms
from semivit.errors import ConfigError, DataError
from semivit.files import atomic_path, atomic_write_json, load_weights, read_json, save_weights


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
    # readable by whoever may read the user's other files (mkstemp alone makes it owner-only 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


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


# --------------------------------------------------------------------------------------------
# Inputs that used to pass silently or end in a raw traceback
# --------------------------------------------------------------------------------------------


def folder_cfg(root, **kw):
    return DataConfig(name="imagefolder", root=str(root), **kw)


def test_scan_skips_hidden_folders_follows_linked_folders_and_reads_tiff(tmp_path, caplog):
    root = make_folder(tmp_path / "d", n=2)
    cat = root / "train" / "cat"
    (cat / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(cat / ".ipynb_checkpoints" / "0.png")  # a copy, not data
    (cat / "more").symlink_to(make_folder(tmp_path / "other", classes=("x",), n=2) / "train" / "x")
    Image.new("RGB", (8, 8)).save(cat / "scan.TIF")
    (cat / "notes.txt").write_text("labels by hand")
    Image.new("RGB", (8, 8)).save(root / "train" / "stray.png")
    with caplog.at_level("WARNING", logger="semivit"):
        bundle = build_data(folder_cfg(root))
    names = [p.split("train/")[-1] for p in bundle.train.paths if "/cat/" in p]
    assert names == ["cat/0.png", "cat/1.png", "cat/more/0.png", "cat/more/1.png", "cat/scan.TIF"]
    assert "notes.txt" in caplog.text and "stray.png" in caplog.text


def test_link_to_a_missing_image_is_an_error_at_scan_time(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    (root / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png.*delete"):
        build_data(folder_cfg(root))


def test_held_out_split_without_some_classes_warns_and_flat_val_explains(tmp_path, caplog):
    root = make_folder(tmp_path / "d", n=2)
    for f in (root / "val" / "eel").iterdir():
        f.unlink()
    with caplog.at_level("WARNING", logger="semivit"):
        bundle = build_data(folder_cfg(root))
    assert bundle.classes == ["cat", "dog", "eel"] and len(bundle.test) == 4
    assert "no images of 1 of 3 classes ('eel')" in caplog.text
    flat = make_folder(tmp_path / "f", n=1, split="train")
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="sort it into class folders"):
        build_data(folder_cfg(flat))


def test_data_root_that_is_a_file_missing_or_under_home(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="data.root=.* is a file"):
        build_data(folder_cfg(tmp_path / "file"))
    with pytest.raises(DataError, match="data.root=.* does not exist"):
        build_data(folder_cfg(tmp_path / "missing"))
    make_folder(tmp_path / "home" / "data", n=1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert len(build_data(folder_cfg("~/data")).train) == 3


@pytest.mark.parametrize(
    "setting, match",
    [
        (dict(channels=2), r"'data.channels' must be one of 0, 1, 3 \(got 2\)"),
        (dict(channels=-1), r"'data.channels' must be one of 0, 1, 3 \(got -1\)"),
        (dict(image_size=0), r"'data.image_size' must be >= 1 \(got 0\)"),
        (dict(max_train_per_class=-1), r"'data.max_train_per_class' must be >= 0 \(got -1\)"),
        (dict(label_percent=150), r"'data.label_percent' must lie in \[0, 100\] \(got 150"),
        (dict(label_percent=-5), r"'data.label_percent' must lie in \[0, 100\] \(got -5"),
        (dict(labels_per_class=-1), r"'data.labels_per_class' must be >= 0 \(got -1\)"),
    ],
)
def test_settings_out_of_range_are_errors(tmp_path, setting, match):
    """A data section built in code is checked by the same rules as one read from a config file."""
    root = make_folder(tmp_path / "d", n=1)
    with pytest.raises(ConfigError, match=match):
        build_data(folder_cfg(root, **setting))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    root = make_folder(tmp_path / "d", n=1)
    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(ramp).save(root / "train" / "cat" / "0.png")
    for channels in (1, 3):
        img = np.asarray(build_data(folder_cfg(root, channels=channels)).train.load(0))
        assert img.max() == 63000 >> 8 and img.min() == 0


def toy_source(n_per_class=4, classes=("a", "b", "c")):
    targets = np.repeat(np.arange(len(classes)), n_per_class)
    return ArraySource(np.zeros((len(targets), 4, 4), np.uint8), targets, list(classes), "toy/train")


def split_file(tmp_path, text, encoding="utf-8"):
    path = tmp_path / "split.csv"
    path.write_text(text, encoding=encoding)
    return path


@pytest.mark.parametrize(
    "text, match",
    [
        ("index\n1\n5\n1\n", "more than once"),
        ("path,index\ntoy/train/000001\n", "row 2: fewer fields"),
        ("index\n1,2\n", "row 2: more fields"),
        ('index\n" "\n', "whole numbers"),
        ("index,label\n1,0\n5,2\n", r"labels differ .*index 5: file 2, data set 1"),
        ("index, path\n1, toy/train/000002\n", "paths differ"),
        ("index,path\n1,elsewhere/000001\n", "paths differ"),
    ],
)
def test_split_csv_faults_are_errors(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        load_label_split(split_file(tmp_path, text), toy_source())


def test_split_csv_from_a_spreadsheet_or_a_moved_data_set_is_read(tmp_path, caplog):
    src = toy_source()
    assert load_label_split(split_file(tmp_path, "Index\n1\n5\n", "utf-8-sig"), src).tolist() == [1, 5]
    with caplog.at_level("WARNING", logger="semivit"):
        moved = split_file(tmp_path, "index,path,label\n1,/old/disk/toy/train/000001,0\n")
        assert load_label_split(moved, src).tolist() == [1]
    assert "another folder" in caplog.text


def test_split_csv_leaving_a_class_unlabeled_warns(tmp_path, caplog):
    csv_path = split_file(tmp_path, "index\n0\n4\n")
    with caplog.at_level("WARNING", logger="semivit"):
        split = make_split(DataConfig(label_csv=str(csv_path)), toy_source(), seed=0)
    assert split.labeled.tolist() == [0, 4]
    assert "no image of 1 of 3 classes ('c')" in caplog.text


def test_label_percent_beside_labels_per_class_warns_which_one_counts(caplog):
    with caplog.at_level("WARNING", logger="semivit"):
        split = make_split(DataConfig(label_percent=50, labels_per_class=1), toy_source(), seed=0)
    assert len(split.labeled) == 6
    assert "labels_per_class=1 is ignored" in caplog.text


def test_every_image_labeled_leaves_no_unlabeled_set_for_the_semi_stage():
    src = toy_source()
    split = make_split(DataConfig(label_percent=100, labels_per_class=0), src, seed=0)
    assert len(split.unlabeled) == 0
    with pytest.raises(DataError, match="unlabeled set is empty.*unlabeled_includes_labeled"):
        TwoViewDataset(src, split.unlabeled, lambda x: x, lambda x: x)
    split = make_split(DataConfig(labels_per_class=4, unlabeled_includes_labeled=True), src, seed=0)
    assert len(TwoViewDataset(src, split.unlabeled, lambda x: x, lambda x: x)) == 12


def test_link_loop_and_unreadable_folder(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    (root / "train" / "cat" / "again").symlink_to(root / "train" / "cat")  # would recurse forever
    assert len(build_data(folder_cfg(root)).train) == 6
    locked = root / "train" / "dog"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with permissions that read any folder")
        with pytest.raises(DataError, match="cannot list folder .*dog"):
            build_data(folder_cfg(root))
    finally:
        locked.chmod(0o755)
