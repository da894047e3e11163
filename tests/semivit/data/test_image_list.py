"""An image folder is listed once per run: the list is kept in the run's cache/images/ with the
modification time of every folder listed, and listed again when one of them changed."""

import json

import numpy as np
from PIL import Image

import semivit.data.sources as sources
from semivit.config.schema import DataConfig


def _folder(root):
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((9 + i, 7, 3), 40 * i, dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_listed_once_then_read_back_until_a_folder_changes(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8)
    lists = tmp_path / "run" / "cache" / "images"
    first = sources.build_data(cfg, lists)
    stored = sorted(lists.glob("*.json"))
    assert len(stored) == 2  # train/ and val/
    assert [p.name.split("-")[1] for p in stored] == ["train", "val"]
    listed = json.loads(stored[0].read_text())
    assert listed["classes"] == ["cat", "dog"] and len(listed["paths"]) == 6 and len(listed["folders"]) == 3

    calls = []
    scan = sources._scan_split
    monkeypatch.setattr(sources, "_scan_split", lambda *a, **k: calls.append(a[0]) or scan(*a, **k))
    again = sources.build_data(cfg, lists)
    assert calls == []  # nothing listed
    assert again.train.paths == first.train.paths and again.classes == first.classes
    assert again.train.targets.tolist() == first.train.targets.tolist() and again.test.paths == first.test.paths

    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(root / "train" / "dog" / "new.png")
    third = sources.build_data(cfg, lists)
    assert [p.name for p in calls] == ["train"]  # only the changed split is listed again
    assert len(third.train) == len(first.train) + 1 and any(p.endswith("new.png") for p in third.train.paths)
    calls.clear()
    sources.build_data(cfg, lists)
    assert calls == []


def test_without_a_list_folder_every_call_lists(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    calls = []
    scan = sources._scan_split
    monkeypatch.setattr(sources, "_scan_split", lambda *a, **k: calls.append(a[0]) or scan(*a, **k))
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8)
    sources.build_data(cfg)
    sources.build_data(cfg)
    assert len(calls) == 4


def test_a_damaged_list_is_listed_again(tmp_path):
    root = _folder(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8)
    lists = tmp_path / "lists"
    first = sources.build_data(cfg, lists)
    for p in lists.glob("*.json"):
        p.write_text("{not json")
    assert sources.build_data(cfg, lists).train.paths == first.train.paths
    assert all(json.loads(p.read_text())["paths"] for p in lists.glob("*.json"))  # written again
