"""The whole pipeline on tiny settings (configs/tiny.yaml): every stage, the file contracts of
docs/run-folder.md, skipping, --from, and a two-rank CPU run through `accelerate launch`."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpt.pipeline import STAGE_NAMES, plan, run_pipeline
from dpt.retrain import run_retrain
from semivit.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SUMMARY_KEYS = {
    "supervised_top1", "semivit_top1", "dpt_top1", "pseudo_label_acc",
    "synthetic_class_acc", "fid", "fid_features", "stage_seconds",
}


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def check_contracts(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    for key in ("supervised_top1", "semivit_top1", "dpt_top1", "pseudo_label_acc", "synthetic_class_acc"):
        assert 0.0 <= summary[key] <= 100.0, key
    assert summary["fid"] >= 0 and summary["fid_features"]
    assert header(run / "stage1" / "pseudo_labels.csv") == ["index", "path", "label", "class_name", "confidence", "top5_labels", "top5_confidences", "true_label"]
    assert header(run / "synthetic" / "manifest.csv") == [
        "file", "label", "class_name", "seed", "guidance_scale", "sampler", "steps", "model"
    ]
    with open(run / "synthetic" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 * 4  # 10 digit classes x generate.num_per_class
    assert all((run / "synthetic" / r["file"]).is_file() for r in rows)
    for stage in ("stage1/finetune", "stage1/semi", "stage3"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        for key in ("top1", "top1_ema", "top5", "num_labeled", "num_unlabeled", "num_test"):
            assert key in metrics, (stage, key)
        assert (run / stage / "config.yaml").is_file()
    semi = json.loads((run / "stage1" / "semi" / "metrics.json").read_text())
    assert "mask_ratio" in semi and "pseudo_label_acc" in semi
    assert (run / "stage0" / "encoder.safetensors").is_file()
    assert (run / "stage2" / "model" / "config.json").is_file()
    for png in ("synthetic/grid.png", "results.png"):
        assert (run / png).stat().st_size > 0
    report = (run / "report.md").read_text()
    assert "Semi-ViT" in report and "FID" in report
    # texture measures of both image sets, and the real-vs-synthetic grid (dpt.quality)
    texture = summary["texture"]
    assert texture["synthetic"]["num_images"] == 40 and texture["real"]["num_images"] > 0
    assert 0.0 <= texture["synthetic"]["isolated_pixel_rate"] <= 1.0
    assert "isolated foreground pixels" in report and "real_vs_synthetic.png" in report
    assert (run / "real_vs_synthetic.png").stat().st_size > 0
    return summary


def test_pipeline_end_to_end_skip_and_from(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}"])
    run_pipeline(cfg)
    check_contracts(cfg.run_dir)
    assert plan(cfg) == []  # everything done with these settings: a second run does nothing

    before = (cfg.run_dir / "stage1" / "semi" / "metrics.json").stat().st_mtime
    todo = [s.name for s, _ in plan(cfg, start="generate")]
    assert todo == STAGE_NAMES[STAGE_NAMES.index("generate"):]
    changed = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "retrain.synthetic_ratio=0.25"])
    assert [s.name for s, _ in plan(changed)] == ["retrain", "report"]
    run_pipeline(changed)
    assert (cfg.run_dir / "stage1" / "semi" / "metrics.json").stat().st_mtime == before
    check_contracts(cfg.run_dir)

    # Classification Accuracy Score: a classifier trained on the synthetic images alone
    cas = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "retrain.synthetic_only=true", "retrain.init=stage0"])
    out = run_retrain(cas, out_dir=tmp_path / "cas")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_labeled"] == 40 and metrics["num_test"] == 80


def numbers(run: Path) -> dict:
    """Every number a run reports (histories and metrics), without wall times."""
    out = {}
    for path in sorted(run.rglob("history.json")) + sorted(run.rglob("metrics.json")):
        for i, row in enumerate(json.loads(path.read_text()) if path.name == "history.json" else [json.loads(path.read_text())]):
            for k, v in row.items():
                if isinstance(v, float) and "second" not in k:
                    out[f"{path.relative_to(run)}[{i}].{k}"] = v
    return out


def test_same_seed_same_numbers_and_a_failed_rerun_loses_nothing(tmp_path):
    """configs/tiny.yaml twice with the same seed (same machine, same threads) gives identical
    numbers; a rerun whose settings are refused leaves every finished output in place."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run_pipeline(load_config(TINY, [f"output_dir={run}"]))
    a, b = numbers(runs[0]), numbers(runs[1])
    assert len(a) > 40 and a == b

    from dpt.cli import main

    images = sorted(p.name for p in (runs[0] / "synthetic").rglob("*.png"))
    assert main(["run", "--config", str(TINY), f"output_dir={runs[0]}", "generate.steps=0"]) == 2
    assert sorted(p.name for p in (runs[0] / "synthetic").rglob("*.png")) == images
    assert plan(load_config(TINY, [f"output_dir={runs[0]}"])) == []


def test_bf16_through_every_stage_on_the_cpu(tmp_path):
    amp = ["pretrain.amp=bf16", "finetune.amp=bf16", "semi.amp=bf16", "diffusion.amp=bf16"]
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *amp])
    run_pipeline(cfg)  # each stage picks its own precision in one process, then pseudo-label runs in fp32
    check_contracts(cfg.run_dir)


def test_pipeline_on_two_cpu_ranks(tmp_path):
    """Two real gloo ranks through `accelerate launch`: the same files, and every test image
    counted once (num_test equals the test set size, not twice it)."""
    run = tmp_path / "run2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "dpt", "run", "--config", str(TINY), f"output_dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_contracts(run)
    semi = json.loads((run / "stage1" / "semi" / "metrics.json").read_text())
    assert semi["num_test"] == 80  # data.max_test in configs/tiny.yaml
    assert "supervised" in proc.stdout.lower() or "semi-vit" in proc.stdout.lower()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
