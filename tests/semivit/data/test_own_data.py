"""Your own data as you have it: labeled/<class>/, unlabeled/ (any depth, no labels), optional val/;
list files; the checks on the mistakes users make, all before any training."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers.own_data import make_own_data, save_image

from semivit.config.load import load_config
from semivit.config.schema import DataConfig
from semivit.data.run_split import run_split
from semivit.data.sources import UNKNOWN, build_data
from semivit.data.split import make_split
from semivit.errors import DataError


def own(root: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=16, **kw)


def test_layout_nested_unlabeled_mixed_modes_and_stray_files(tmp_path, caplog):
    info = make_own_data(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="semivit"):
        bundle = build_data(own(tmp_path / "d"))
    assert bundle.classes == ["ant", "bee", "cow"]
    train = bundle.train
    # labeled images keep their class, every unlabeled one carries UNKNOWN: no label anywhere to hide
    assert np.bincount(train.targets[train.targets >= 0]).tolist() == [3, 2, 4]
    unlabeled = [p for p, t in zip(train.paths, train.targets, strict=True) if t == UNKNOWN]
    assert sorted(unlabeled) == sorted(info["unlabeled"])
    assert len(bundle.test) == 6 and (bundle.test.targets >= 0).all()
    # the two stray files (notes.txt, Thumbs.db) are counted in one line
    lines = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 files are not images")
    # PNG/JPEG in RGB, RGBA, P, CMYK and L, of several sizes, all load as the data's mode
    sizes = set()
    for i in range(len(train)):
        img = train.load(i)
        assert img.mode == "RGB"
        sizes.add(img.size)
    assert len(sizes) > 3


def test_transparent_pixels_are_white(tmp_path):
    make_own_data(tmp_path / "d")
    bundle = build_data(own(tmp_path / "d"))
    i = next(k for k, p in enumerate(bundle.train.paths) if p.endswith("labeled/ant/img2.png"))  # an RGBA image
    top = np.asarray(bundle.train.load(i))[0]  # its first row is transparent
    assert (top == 255).all()


def test_the_labeled_images_are_the_labeled_set(tmp_path):
    make_own_data(tmp_path / "d")
    cfg = own(tmp_path / "d", labels_per_class=1)  # a drawing setting, which this layout does not use
    bundle = build_data(cfg)
    for seed in (0, 1):
        split = make_split(cfg, bundle.train, seed)
        assert split.labeled.tolist() == np.flatnonzero(bundle.train.targets >= 0).tolist()
        assert split.unlabeled.tolist() == np.flatnonzero(bundle.train.targets < 0).tolist()


def test_run_split_is_written_from_the_given_labels(tmp_path):
    make_own_data(tmp_path / "d")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'd'}"])
    bundle = build_data(cfg.data)
    split = run_split(cfg, bundle.train, "test")
    with open(tmp_path / "run" / "label_split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == split.labeled.tolist() and len(rows) == 9
    assert all("/labeled/" in r["path"] for r in rows)


def test_without_val_the_test_set_is_empty(tmp_path, caplog):
    import shutil

    make_own_data(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "val")
    with caplog.at_level(logging.WARNING, logger="semivit"):
        bundle = build_data(own(tmp_path / "d"))
    assert len(bundle.test) == 0 and len(bundle.train) == 21
    assert any("no held-out top-1" in r.getMessage() for r in caplog.records)


def test_list_files(tmp_path):
    info = make_own_data(tmp_path / "d")
    d = tmp_path / "d"
    lab = tmp_path / "lists" / "labeled.csv"
    lab.parent.mkdir()
    rows = [(f"../d/labeled/{c}/{p.name}", c) for c in ("ant", "bee") for p in sorted((d / "labeled" / c).glob("img*"))]
    lab.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    unl = tmp_path / "lists" / "unlabeled.txt"
    unl.write_text("# my unlabeled images\n" + "\n".join(info["unlabeled"][:5]) + "\n")
    val = tmp_path / "lists" / "val.csv"
    val.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted((d / "val" / "bee").iterdir())))
    bundle = build_data(DataConfig(name="imagefolder", labeled_csv=str(lab), unlabeled=str(unl), val_csv=str(val)))
    assert bundle.classes == ["ant", "bee"]
    assert np.bincount(bundle.train.targets[bundle.train.targets >= 0]).tolist() == [3, 2]
    assert (bundle.train.targets == UNKNOWN).sum() == 5 and len(bundle.test) == 2
    assert all(Path(p).is_file() for p in bundle.train.paths)
    # a folder works as data.unlabeled too, beside a root with labeled/
    bundle = build_data(own(d, unlabeled=str(d / "unlabeled" / "a")))
    assert (bundle.train.targets == UNKNOWN).sum() == 6  # a/ and a/b/ of the nested folders


# ---- the mistakes of item 4, each before any training -------------------------------------


def test_only_one_class(tmp_path):
    make_own_data(tmp_path / "d", classes=("ant",), labeled_per_class=(3,), val_per_class=0)
    with pytest.raises(DataError, match=r"only one class \('ant'\).*at least two"):
        build_data(own(tmp_path / "d"))


def test_class_folder_without_images(tmp_path):
    make_own_data(tmp_path / "d")
    (tmp_path / "d" / "labeled" / "dog").mkdir()
    with pytest.raises(DataError, match=r"labeled/dog.*hold no images"):
        build_data(own(tmp_path / "d"))


def test_val_class_that_labeled_lacks(tmp_path):
    make_own_data(tmp_path / "d")
    save_image(tmp_path / "d" / "val" / "yak" / "x.png", np.zeros((8, 8, 3), np.uint8), "RGB")
    with pytest.raises(DataError, match=r"class folders that .*labeled.* lacks: 'yak'"):
        build_data(own(tmp_path / "d"))


def test_empty_unlabeled(tmp_path, caplog):
    make_own_data(tmp_path / "d", unlabeled=0)
    with pytest.raises(DataError, match=r"no unlabeled images: '.*unlabeled'.*data.unlabeled_includes_labeled"):
        build_data(own(tmp_path / "d"))
    with caplog.at_level(logging.WARNING, logger="semivit"):
        bundle = build_data(own(tmp_path / "d", unlabeled_includes_labeled=True))
    assert any("no unlabeled images" in r.getMessage() for r in caplog.records)
    split = make_split(own(tmp_path / "d", unlabeled_includes_labeled=True), bundle.train, 0)
    assert len(split.unlabeled) == len(bundle.train) == 9


def test_duplicates_across_labeled_and_unlabeled(tmp_path, caplog):
    import shutil

    make_own_data(tmp_path / "d")
    copy = tmp_path / "d" / "unlabeled" / "c" / "copy_of_bee.png"
    shutil.copy(tmp_path / "d" / "labeled" / "bee" / "img0.png", copy)
    with caplog.at_level(logging.WARNING, logger="semivit"):
        build_data(own(tmp_path / "d"))
    lines = [r.getMessage() for r in caplog.records if "copies" in r.getMessage()]
    assert len(lines) == 1 and "1 unlabeled images" in lines[0]
    assert "copy_of_bee.png" in lines[0] and "labeled/bee/img0.png" in lines[0]


def test_unreadable_image_is_named_or_skipped_and_listed(tmp_path):
    make_own_data(tmp_path / "d")
    bad = tmp_path / "d" / "unlabeled" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"1 images cannot be read: '.*broken.jpg'.*data.skip_unreadable=true"):
        build_data(own(tmp_path / "d"))
    cfg = load_config(
        None,
        [f"output_dir={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'd'}", "data.skip_unreadable=true"],
    )
    bundle = build_data(cfg.data)
    assert str(bad) not in bundle.train.paths and len(bundle.train) == 21
    run_split(cfg, bundle.train, "test")
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(bad) + "\t")


def test_benchmark_layout_keeps_working(tmp_path):
    from test_imagefolder_io import make_folder

    root = make_folder(tmp_path / "d")
    cfg = DataConfig(name="imagefolder", root=str(root), labels_per_class=2)
    bundle = build_data(cfg)
    assert not bundle.train.given_labels and (bundle.train.targets >= 0).all()
    assert len(make_split(cfg, bundle.train, 0).labeled) == 6
