"""Your own data through the whole pipeline (`dpt run --config configs/tiny.yaml data.name=imagefolder
data.root=ROOT`): no hidden label anywhere, the measures that need one reported as not available
with the reason, with and without val/; the pseudo-labeled set exported as an ImageFolder."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.own_data import make_own_data

from dpt.pipeline import run_pipeline
from semivit.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """The layout with val/ (4 per class, enough for FID) through the command line."""
    tmp = tmp_path_factory.mktemp("own")
    info = make_own_data(tmp / "data", unlabeled=24, val_per_class=4)
    run = tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dpt", "run", "--config", str(TINY), "data.name=imagefolder",
           f"data.root={tmp / 'data'}", f"output_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, run, info


def test_run_with_val(own_run):
    tmp, run, info = own_run
    # the pseudo-label file lists every unlabeled image exactly once, with no true label
    pl = rows(run / "stage1" / "pseudo_labels.csv")
    unlabeled = [r for r in pl if "/unlabeled/" in r["path"]]
    assert sorted(r["path"] for r in unlabeled) == sorted(info["unlabeled"])
    assert all(r["true_label"] == "" for r in unlabeled)
    assert sum("/labeled/" in r["path"] for r in pl) == 9
    # the labeled split is the labeled images, as given
    split = rows(run / "label_split.csv")
    assert len(split) == 9 and all("/labeled/" in r["path"] for r in split)
    assert not (run / "judge").exists()  # no ceiling model: it would need every label
    summary = json.loads((run / "summary.json").read_text())
    assert summary["given_labels"] is True and summary["num_test"] == 12
    for key in ("supervised_top1", "semivit_top1", "dpt_top1"):
        assert 0 <= summary[key] <= 100
    assert summary["ceiling_top1"] is None and summary["pseudo_label_acc"] is None
    na = summary["not_available"]
    assert set(na) == {"pseudo_label_acc", "ceiling_top1"}
    assert all("no true label" in why for why in na.values())
    # synthetic class accuracy by a classifier that saw no hidden label, and FID against val/
    assert "stage-1 Semi-ViT" in summary["synthetic_class_acc_judge"]
    assert 0 <= summary["synthetic_class_acc"] <= 100
    assert summary["fid"] >= 0 and summary["fid_real"] == "test" and summary["fid_num_real"] == 12
    stage2 = json.loads((run / "stage2" / "metrics.json").read_text())
    assert stage2["labels"]["label_acc_vs_true"] is None and stage2["labels"]["num_images"] == 33
    report = (run / "report.md").read_text()
    assert "## Not available" in report and "`ceiling_top1`: not available" in report
    assert "the stage-1 Semi-ViT classifier" in report


def test_export_pseudo_labels(own_run):
    tmp, run, info = own_run
    from dpt.cli import main

    cfg = ["--config", str(TINY), "data.name=imagefolder", f"data.root={tmp / 'data'}", f"output_dir={run}"]
    assert main(["export-pseudo-labels", *cfg]) == 0
    out = run / "pseudo_labeled"
    listed = rows(out / "labels.csv")
    assert len(listed) == 9 + 24
    for r in listed:
        f = out / r["file"]
        assert f.is_symlink() and f.resolve() == Path(r["source"]).resolve() and f.parent.name == r["class"]
    assert sum(r["labeled"] == "1" for r in listed) == 9
    # copies, without the labeled images, above a confidence
    dest = tmp / "exported"
    args = [f"out={dest}", "mode=copy", "include_labeled=false", "min_confidence=0.34"]
    assert main(["export-pseudo-labels", *cfg, *args]) == 0
    listed = rows(dest / "labels.csv")
    pl = {r["path"]: float(r["confidence"]) for r in rows(run / "stage1" / "pseudo_labels.csv") if "/unlabeled/" in r["path"]}
    assert len(listed) == sum(c >= 0.34 for c in pl.values())
    assert all(r["labeled"] == "0" and not (dest / r["file"]).is_symlink() for r in listed)


def test_run_without_val(tmp_path):
    make_own_data(tmp_path / "data", unlabeled=24)
    shutil.rmtree(tmp_path / "data" / "val")
    cfg = load_config(TINY, ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"])
    run_pipeline(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_test"] == 0
    for key in ("supervised_top1", "semivit_top1", "dpt_top1", "ceiling_top1"):
        assert summary[key] is None and key in summary["not_available"]
    assert "no held-out images" in summary["not_available"]["semivit_top1"]
    # FID against the training images (labeled + unlabeled), class accuracy by the semi model
    assert summary["fid_real"] == "train" and summary["fid_num_real"] == 33 and summary["fid"] >= 0
    assert summary["synthetic_class_acc"] is not None
    semi = json.loads((tmp_path / "run" / "stage1" / "semi" / "metrics.json").read_text())
    assert semi["top1"] is None and semi["num_test"] == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "no held-out images: no held-out top-1 is measured" in report
