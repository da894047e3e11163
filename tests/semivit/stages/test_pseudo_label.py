"""Pseudo-labeling: per-rank part files merged by rank 0, on images of any size and mode; two
ranks give the same file as one."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers.mixed_images import make_mixed_imagefolder

from semivit.cli import main
from semivit.config.schema import ModelConfig
from semivit.data.sources import ArraySource
from semivit.models.classifier import create_classifier, save_classifier
from semivit.stages.pseudo_label import COLUMNS, label_share, merge_parts, part_path

ROOT = Path(__file__).resolve().parents[3]
CLASSES = ["a", "b", "c"]


def make_classifier(folder: Path, classes, channels: int = 3, size: int = 16) -> Path:
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name="vit_micro_patch4", drop_path=0.0), len(classes), size, channels)
    meta = {"classes": classes, "channels": channels, "image_size": size, "mean": [0.5] * channels,
            "std": [0.5] * channels, "model": "vit_micro_patch4", "global_pool": "avg"}
    save_classifier(folder, model, model, meta)
    return folder


def overrides(tmp_path: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=16",
            "data.labels_per_class=1", "model.name=vit_micro_patch4", "pseudo_label.batch_size=5",
            f"checkpoint={tmp_path / 'clf'}", "tensorboard=false"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pseudo_labels_on_mixed_sizes_and_modes(tmp_path):
    make_mixed_imagefolder(tmp_path / "data", CLASSES, per_class=7)
    make_classifier(tmp_path / "clf", CLASSES)
    assert main(["pseudo-label", *overrides(tmp_path, tmp_path / "one")]) == 0
    csv_path = tmp_path / "one" / "stage1" / "pseudo_labels.csv"
    rows = read_rows(csv_path)
    assert list(rows[0]) == COLUMNS and [int(r["index"]) for r in rows] == list(range(21))
    assert {Path(r["path"]).suffix for r in rows} == {".jpg", ".png"}
    labeled = [r for r in rows if r["confidence"] == "1.0000"]
    assert len(labeled) >= 3 and all(r["label"] == r["true_label"] for r in labeled)
    for r in rows:
        ids, ps = r["top5_labels"].split(), [float(p) for p in r["top5_confidences"].split()]
        assert len(ids) == 3 and ps == sorted(ps, reverse=True) and r["class_name"] == CLASSES[int(r["label"])]
    summary = json.loads((tmp_path / "one" / "stage1" / "pseudo_labels.json").read_text())
    assert summary["num_unlabeled"] + summary["num_labeled"] == 21
    assert sum(summary["count_per_class"].values()) == summary["num_unlabeled"]
    assert not list((tmp_path / "one" / "stage1").glob(".pseudo_labels.part*"))  # parts removed after the merge
    from dpt.train_diffusion import read_labels_csv  # stage 2 still reads it
    from semivit.config.load import load_config
    from semivit.data.sources import build_data

    source = build_data(load_config(None, overrides(tmp_path, tmp_path / "one")).data).train
    idx, lab, conf = read_labels_csv(csv_path, source)
    assert len(idx) == 21 and conf is not None and (lab >= 0).all()


class _Fixed(torch.nn.Module):
    """Logits that favour class (index mod 3), from the image's first pixel (set to the index)."""

    def forward(self, x):
        i = x[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(i % 3, 3).float() * 3.0


def test_unknown_true_label_empty_and_merge_in_rank_order(tmp_path):
    images = np.zeros((10, 4, 4), dtype=np.uint8)
    images[:, 0, 0] = np.arange(10)
    targets = np.array([0, 1, 2, -1, -1, 2, -1, 1, 0, -1])
    source = ArraySource(images, targets, CLASSES, "mem")
    is_labeled = np.zeros(10, dtype=bool)
    is_labeled[[0, 1]] = True

    class Acc:
        device, is_local_main_process = torch.device("cpu"), False

        def autocast(self):
            return torch.autocast("cpu", enabled=False)

    def loader(share):
        x = torch.from_numpy(images[share]).float().unsqueeze(1)
        return [(x, torch.from_numpy(targets[share]), torch.from_numpy(share))]

    csv_path = tmp_path / "pl.csv"
    shares = np.array_split(np.arange(10), 3)
    for r, share in enumerate(shares):
        label_share(_Fixed(), loader(share), Acc(), source, is_labeled, part_path(csv_path, r, 3))
    summary = merge_parts([part_path(csv_path, r, 3) for r in range(3)], csv_path, is_labeled, CLASSES)
    rows = read_rows(csv_path)
    assert [int(r["index"]) for r in rows] == list(range(10))
    assert [r["true_label"] for r in rows] == ["0", "1", "2", "", "", "2", "", "1", "0", ""]
    assert [int(r["label"]) for r in rows] == [i % 3 for i in range(10)]
    assert summary["num_unlabeled"] == 8 and summary["num_with_true_label"] == 4
    assert summary["accuracy"] == 100.0 * 3 / 4  # index 8: label 2, true 0
    # a part out of order is refused, not silently merged
    parts = [part_path(csv_path, r, 3) for r in (1, 0, 2)]
    try:
        merge_parts(parts, tmp_path / "bad.csv", is_labeled, CLASSES)
    except RuntimeError as e:
        assert "was due" in str(e)
    else:
        raise AssertionError("merge accepted parts out of order")


def test_two_ranks_write_the_same_pseudo_labels_as_one(tmp_path):
    make_mixed_imagefolder(tmp_path / "data", CLASSES, per_class=7)
    make_classifier(tmp_path / "clf", CLASSES)
    assert main(["pseudo-label", *overrides(tmp_path, tmp_path / "one")]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           "-m", "semivit", "pseudo-label", *overrides(tmp_path, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = read_rows(tmp_path / "one" / "stage1" / "pseudo_labels.csv")
    two = read_rows(tmp_path / "two" / "stage1" / "pseudo_labels.csv")
    assert len(one) == len(two) == 21
    for a, b in zip(one, two, strict=True):
        assert {k: a[k] for k in ("index", "path", "label", "top5_labels", "true_label")} == \
            {k: b[k] for k in ("index", "path", "label", "top5_labels", "true_label")}
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 2e-4


def test_evaluate_on_mixed_sizes_and_modes(tmp_path):
    from semivit.config.load import load_config
    from semivit.stages.evaluate import run_evaluate

    make_mixed_imagefolder(tmp_path / "data", CLASSES, per_class=4, held_out=5)
    make_classifier(tmp_path / "clf", CLASSES)
    metrics = run_evaluate(load_config(None, overrides(tmp_path, tmp_path / "ev")), str(tmp_path / "clf"))
    assert metrics["num_test"] == 15 and 0 <= metrics["top1_ema"] <= 100
    assert len(metrics["per_class_acc"]) == 3
