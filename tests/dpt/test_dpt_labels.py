"""Reading the labels that stage 2 trains on: pseudo_labels.csv, a user's CSV, or the true labels."""

import numpy as np
import pytest

from dpt.errors import DPTError
from dpt.train_diffusion import load_training_labels
from semivit.config.load import load_config
from semivit.data.sources import build_data


@pytest.fixture(scope="module")
def source():
    return build_data(load_config(None, ["data.name=digits", "data.max_train=40"]).data).train


def cfg_for(tmp_path, **diff):
    pairs = ["data.name=digits", "data.max_train=40", f"output_dir={tmp_path}"]
    pairs += [f"diffusion.{k}={v}" for k, v in diff.items()]
    return load_config(None, pairs)


def write_pseudo(path, source, labels, conf):
    lines = ["index,path,label,confidence,true_label"]
    for i, (lab, c) in enumerate(zip(labels, conf, strict=True)):
        lines.append(f"{i},{source.paths[i]},{lab},{c},{source.targets[i]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_true_labels(tmp_path, source):
    lab = load_training_labels(cfg_for(tmp_path, labels="true"), source)
    assert lab.source == "true" and len(lab.indices) == 40
    assert np.array_equal(lab.labels, source.targets)


def test_auto_reads_stage1_file_with_filter_and_cap(tmp_path, source):
    labels = (source.targets + 1) % 10  # every pseudo-label wrong: shows they are used, not the true ones
    labels[:10] = source.targets[:10]
    conf = np.linspace(0.0, 1.0, 40)
    write_pseudo(tmp_path / "stage1" / "pseudo_labels.csv", source, labels, conf)
    lab = load_training_labels(cfg_for(tmp_path), source)
    assert np.array_equal(lab.labels, labels) and lab.info["label_acc_vs_true"] == pytest.approx(0.25)
    lab = load_training_labels(cfg_for(tmp_path, min_confidence=0.5), source)
    assert np.all(lab.indices >= 20) and len(lab.indices) == 20
    lab = load_training_labels(cfg_for(tmp_path, max_per_class=1), source)
    counts = np.bincount(lab.labels, minlength=10)
    assert counts.max() == 1
    # the cap keeps the most confident image of each class
    for i, y in zip(lab.indices, lab.labels, strict=True):
        assert conf[i] == conf[(labels == y)].max()


def test_user_csv_without_path_or_confidence(tmp_path, source):
    f = tmp_path / "mine.csv"
    f.write_text("index,label\n3,1\n5,2\n")
    lab = load_training_labels(cfg_for(tmp_path, labels=str(f)), source)
    assert lab.indices.tolist() == [3, 5] and lab.labels.tolist() == [1, 2]
    with pytest.raises(DPTError, match="confidence"):
        load_training_labels(cfg_for(tmp_path, labels=str(f), min_confidence=0.5), source)


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "has no rows"),
        ("index,label\n", "has no rows"),
        ("idx,label\n1,2\n", "lacks column"),
        ("index,label\n1,x\n", "integers"),
        ("index,label\n99,1\n", "outside"),
        ("index,label\n1,1\n1,2\n", "more than once"),
        ("index,label\n1,10\n", r"outside 0\.\.9"),
        ("index,path,label\n1,digits/train/999999,1\n", "paths differ"),
    ],
)
def test_bad_label_files(tmp_path, source, text, match):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(DPTError, match=match):
        load_training_labels(cfg_for(tmp_path, labels=str(f)), source)


def test_missing_files(tmp_path, source):
    with pytest.raises(DPTError, match="pseudo-label stage"):
        load_training_labels(cfg_for(tmp_path), source)
    with pytest.raises(DPTError, match="not found"):
        load_training_labels(cfg_for(tmp_path, labels=str(tmp_path / "x.csv")), source)


def test_filter_leaving_nothing(tmp_path, source):
    write_pseudo(tmp_path / "stage1" / "pseudo_labels.csv", source, source.targets, np.full(40, 0.2))
    with pytest.raises(DPTError, match="no training images left"):
        load_training_labels(cfg_for(tmp_path, min_confidence=0.9), source)
