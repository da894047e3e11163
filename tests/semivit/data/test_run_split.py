"""The run's labeled split: drawn once into <run>/label_split.csv, read back by every later stage,
drawn again when its settings change, and a clear error when the data changed between stages."""

import csv
import json

import numpy as np
import pytest
from helpers.reads import only_read
from PIL import Image

from semivit.cli import main as semivit_main
from semivit.config.load import load_config
from semivit.data.run_split import run_split
from semivit.data.sources import build_data
from semivit.data.split import make_split
from semivit.errors import DataError

DIGITS = ["data.name=digits", "data.max_train=200", "data.labels_per_class=4"]


def cfg_of(run, *overrides):
    return load_config(None, [f"output_dir={run}", *overrides])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, kept):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "path", "label"])
        w.writeheader()
        w.writerows(kept)


def test_split_is_drawn_once_and_equals_the_in_memory_draw(tmp_path):
    cfg = cfg_of(tmp_path, *DIGITS)
    train = build_data(cfg.data).train
    split = run_split(cfg, train, "finetune")
    ref = make_split(cfg.data, train, cfg.seed)  # what every stage drew before: same indices
    assert np.array_equal(split.labeled, ref.labeled) and np.array_equal(split.unlabeled, ref.unlabeled)
    assert split.labeled.dtype == ref.labeled.dtype
    meta = json.loads((tmp_path / "label_split.json").read_text())
    assert meta["drawn_by"] == "finetune" and meta["num_train"] == 200 and meta["num_labeled"] == 40
    assert meta["seed"] == cfg.seed and meta["data.labels_per_class"] == 4 and meta["data.name"] == "digits"
    assert [r.keys() for r in rows(tmp_path / "label_split.csv")][0] == {"index", "path", "label"}

    # a later stage reads the file: what is on disk is the split, not a new draw
    kept = rows(tmp_path / "label_split.csv")[::2]
    write_rows(tmp_path / "label_split.csv", kept)
    again = run_split(cfg, train, "semi")
    assert again.labeled.tolist() == [int(r["index"]) for r in kept]
    assert json.loads((tmp_path / "label_split.json").read_text())["drawn_by"] == "finetune"


def test_changed_settings_draw_the_split_again(tmp_path):
    train = build_data(cfg_of(tmp_path, *DIGITS).data).train
    run_split(cfg_of(tmp_path, *DIGITS), train, "finetune")
    for changed in (["data.labels_per_class=6"], ["seed=3"], ["data.labels_per_class=0", "data.label_percent=10"]):
        cfg = cfg_of(tmp_path, *DIGITS, *changed)
        split = run_split(cfg, train, "semi")
        assert np.array_equal(split.labeled, make_split(cfg.data, train, cfg.seed).labeled), changed
        assert json.loads((tmp_path / "label_split.json").read_text())["drawn_by"] == "semi"
        assert len(rows(tmp_path / "label_split.csv")) == len(split.labeled)
    assert not list(tmp_path.glob(".label_split*"))  # no temporary file left behind


def test_a_label_csv_with_other_rows_is_another_split(tmp_path):
    given = tmp_path / "labels.csv"
    given.write_text("index\n1\n5\n9\n")
    cfg = cfg_of(tmp_path / "run", *DIGITS, f"data.label_csv={given}")
    train = build_data(cfg.data).train
    assert run_split(cfg, train, "finetune").labeled.tolist() == [1, 5, 9]
    given.write_text("index\n2\n4\n")  # same file name, other rows
    assert run_split(cfg, train, "semi").labeled.tolist() == [2, 4]


def image_folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_data_folder_that_changed_between_stages_is_a_clear_error(tmp_path):
    data = image_folder(tmp_path / "data")
    cfg = cfg_of(tmp_path / "run", "data.name=imagefolder", f"data.root={data}", "data.labels_per_class=2")
    split = run_split(cfg, build_data(cfg.data).train, "finetune")

    # one more image: every index after it moves
    Image.new("RGB", (8, 8)).save(data / "train" / "ant" / "00.png")
    with pytest.raises(DataError, match=r"drawn from 12 training images.*now has 13.*label_split.csv"):
        run_split(cfg, build_data(cfg.data).train, "semi")

    # same count, a labeled image replaced by another name: its index names another file
    (data / "train" / "ant" / "00.png").unlink()
    first = build_data(cfg.data).train.paths[int(split.labeled[0])]
    (data / "train" / "ant" / first.rsplit("/", 1)[1]).rename(data / "train" / "ant" / "zz.png")
    with pytest.raises(DataError, match=r"paths differ from the data set.*delete '.*label_split.csv'"):
        run_split(cfg, build_data(cfg.data).train, "semi")


TINY = [
    *DIGITS,
    "data.image_size=8",
    "data.max_test=60",
    "model.name=vit_micro_patch4",
    "model.init=none",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "finetune.eval_every=0",
    "semi.epochs=1",
    "semi.batch_size=8",
    "semi.mu=2",
    "semi.steps_per_epoch=2",
    "semi.eval_every=0",
    "pipeline.judge_epochs=1",
]


def main(argv):
    """TINY holds the settings of every stage: each command gets those it reads."""
    return semivit_main(only_read("semivit", argv, TINY))


def test_stages_read_the_run_split_and_the_judge_leaves_it_alone(tmp_path):
    run = tmp_path / "run"
    assert main(["finetune", f"output_dir={run}", *TINY]) == 0
    split_file, meta_file = run / "label_split.csv", run / "label_split.json"
    assert (run / "stage1" / "finetune" / "label_split.csv").read_text() == split_file.read_text()

    kept = rows(split_file)[1:]  # edited on disk between the stages
    write_rows(split_file, kept)
    assert main(["semi", f"output_dir={run}", *TINY]) == 0
    assert (run / "stage1" / "semi" / "label_split.csv").read_text() == split_file.read_text()
    m = json.loads((run / "stage1" / "semi" / "metrics.json").read_text())
    assert m["num_labeled"] == len(kept) and m["num_unlabeled"] == 200 - len(kept)

    from dpt.pipeline import _run_judge

    before = split_file.read_text(), meta_file.read_text()
    _run_judge(cfg_of(run, *TINY))  # every label: not the run's split
    assert (split_file.read_text(), meta_file.read_text()) == before
    assert len(rows(run / "judge" / "label_split.csv")) == 200
