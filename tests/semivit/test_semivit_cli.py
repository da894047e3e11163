"""The command line end to end on tiny settings, resume after interruption, clean error lines."""

import csv
import json
import subprocess
import sys

import pytest
from helpers.reads import only_read

from semivit.cli import main as semivit_main

TINY = [
    "data.name=digits",
    "data.image_size=8",
    "data.max_train=240",
    "data.max_test=120",
    "data.labels_per_class=4",
    "model.name=vit_micro_patch4",
    "pretrain.epochs=2",
    "pretrain.batch_size=64",
    "finetune.epochs=3",
    "finetune.batch_size=16",
    "finetune.eval_every=2",
    "semi.epochs=2",
    "semi.batch_size=8",
    "semi.mu=2",
    "semi.tau=0.1",
    "semi.eval_every=1",
]


def main(argv):
    """TINY holds the settings of every stage: each command gets those it reads."""
    return semivit_main(only_read("semivit", argv, TINY))


def cli(out, *args):
    return main([args[0], f"output_dir={out}", *TINY, *args[1:]])


def test_all_stages_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert cli(out, "pretrain") == 0
    s0 = out / "stage0"
    assert {"encoder.safetensors", "metrics.json", "reconstruction.png", "curves.png", "config.yaml"} <= {p.name for p in s0.iterdir()}
    assert not (s0 / "checkpoints").exists()

    assert cli(out, "finetune") == 0
    ft = out / "stage1" / "finetune"
    m = json.loads((ft / "metrics.json").read_text())
    assert m["init"].endswith("stage0/encoder.safetensors")  # model.init=auto found this run's encoder
    assert m["num_labeled"] == 40 and m["num_unlabeled"] == 200 and m["num_test"] == 120
    assert "seconds" in m

    assert cli(out, "semi") == 0
    semi = out / "stage1" / "semi"
    expected = {"config.yaml", "metrics.json", "meta.json", "model.safetensors", "model_ema.safetensors",
                "label_split.csv", "history.json", "curves.png", "logs"}
    assert expected <= {p.name for p in semi.iterdir()}
    m = json.loads((semi / "metrics.json").read_text())
    for key in ("top1", "top1_ema", "top5", "num_labeled", "num_unlabeled", "num_test", "mask_ratio", "pseudo_label_acc", "seconds"):
        assert key in m, key
    hist = json.loads((semi / "history.json").read_text())
    assert len(hist) == 2 and len(hist[-1]["hist_pseudo"]) == 10 and "top1_ema" in hist[0]
    assert (semi / "label_split.csv").read_text() == (ft / "label_split.csv").read_text()

    assert cli(out, "evaluate", f"checkpoint={semi}") == 0
    ev = json.loads((out / "evaluate" / "semi" / "metrics.json").read_text())
    assert ev["top1_ema"] == pytest.approx(m["top1_ema"])  # same weights, same held-out split

    assert cli(out, "pseudo-label") == 0
    with open(out / "stage1" / "pseudo_labels.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["index", "path", "label", "class_name", "confidence", "top5_labels", "top5_confidences", "true_label"]
        rows = list(reader)
    assert [int(r["index"]) for r in rows] == list(range(240))
    labeled = {int(r["index"]) for r in csv.DictReader(open(semi / "label_split.csv"))}
    for r in rows:
        if int(r["index"]) in labeled:
            assert float(r["confidence"]) == 1.0 and r["label"] == r["true_label"]
    summary = json.loads((out / "stage1" / "pseudo_labels.json").read_text())
    assert summary["num_unlabeled"] == 200 and sum(summary["count_per_class"].values()) == 200
    unl = [r for r in rows if int(r["index"]) not in labeled]
    acc = 100 * sum(r["label"] == r["true_label"] for r in unl) / len(unl)
    assert summary["accuracy"] == pytest.approx(acc, abs=1e-3)


def test_fixmatch_mode_and_resume_after_interruption(tmp_path):
    out = tmp_path / "run"
    assert cli(out, "finetune", "model.init=none", "finetune.epochs=2") == 0
    # interrupted after epoch 1: resumable state stays, no final outputs yet
    assert cli(out, "semi", "semi.teacher=student", "semi.epochs=3", "stop_after_epoch=1") == 0
    semi = out / "stage1" / "semi"
    assert (semi / "checkpoints" / "epoch_1").is_dir() and not (semi / "metrics.json").exists()
    assert cli(out, "semi", "semi.teacher=student", "semi.epochs=3") == 0
    hist = json.loads((semi / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]  # continued at epoch 2, history kept
    assert not (semi / "checkpoints").exists()
    assert json.loads((semi / "metrics.json").read_text())["teacher"] == "student"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["semi.lamda_u=1"], "Did you mean 'lambda_u'"),
        (["data.name=imagefolder", "data.root=/nonexistent/x"], "/nonexistent/x/train"),
        (["data.labels_per_class=500"], "labels_per_class"),
        (["model.init=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, capsys, args, needle):
    assert main(["finetune", f"output_dir={tmp_path}", *TINY, *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and needle in err[0]


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "semivit", "finetune", f"output_dir={tmp_path}", "data.name=digits", "finetune.epocs=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown setting 'finetune.epocs'. Did you mean 'epochs'?" in proc.stderr


def test_semi_without_finetune_says_what_to_run(tmp_path, capsys):
    assert main(["semi", f"output_dir={tmp_path}", *TINY]) == 2
    assert "semivit finetune" in capsys.readouterr().err


def test_semi_with_distribution_alignment_resumes_its_running_mean(tmp_path):
    import torch

    out = tmp_path / "run"
    assert cli(out, "finetune", "model.init=none", "finetune.epochs=2") == 0
    args = ("semi.dist_align=labeled", "semi.dist_align_momentum=0.5", "semi.epochs=2")
    assert cli(out, "semi", *args, "stop_after_epoch=1") == 0
    ckpt = out / "stage1" / "semi" / "checkpoints" / "epoch_1"
    from safetensors.torch import load_file

    p_model = load_file(str(ckpt / "align.safetensors"))["p_model"]
    assert p_model.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(p_model, torch.full((10,), 0.1))  # it moved, and was saved
    assert cli(out, "semi", *args) == 0
    hist = json.loads((out / "stage1" / "semi" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert cli(out, "semi", "semi.dist_align=flat") == 2  # a bad value is a clean error
