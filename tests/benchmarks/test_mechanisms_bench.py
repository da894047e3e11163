"""benchmarks/mechanisms_mnist.py on configs/tiny.yaml: every cell it promises is measured, paired
with its K = 0 control, and the table, JSON (with its provenance) and plot come out (the numbers mean
nothing here)."""

import json
import subprocess
import sys
from pathlib import Path

from semivit.config.load import load_config
from semivit.stages.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]


def test_mechanisms_benchmark_on_tiny(tmp_path):
    enc_run = tmp_path / "enc"
    run_pretrain(load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={enc_run}"]))
    encoder = enc_run / "stage0" / "encoder.safetensors"
    out, results = tmp_path / "mech", tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.mechanisms_mnist", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--out", str(out), "--results", str(results), "--labels", "2", "--seeds", "0", "--modes", "probe", "supervised", "--k", "3", "--pool", "4",
        "--filter", "0.05", "--encoder", str(encoder), "--mixup", "2", "--cas", "2", "--cas-modes", "probe",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((results / "mechanisms.json").read_text())
    assert written["provenance"]["command"].startswith("python -m benchmarks.mechanisms_mnist --config ")
    rows = written["results"]
    assert len(rows) == 1 and (rows[0]["labels"], rows[0]["seed"]) == (2, 0)
    cells = rows[0]["cells"]
    for key in ("probe/none", "probe/pseudo-real", "probe/synthetic", "probe/synthetic-f", "supervised/none",
                "supervised/pseudo-real", "supervised/synthetic", "cas-probe/synthetic", "cas-probe/real", "semivit/mixup"):
        assert 0 <= cells[key] <= 100, key
    # the supervised K = 0 cell is stage 1a itself
    assert cells["supervised/none"] == rows[0]["supervised"]
    assert rows[0]["mixup_on"]["top1"] == cells["semivit/mixup"] and "mask_ratio_last" in rows[0]["mixup_off"]
    extra = json.loads((out / "l2_seed0" / "bench" / "probe_synthetic-f" / "metrics.json").read_text())
    assert extra["filter_conf"] == 0.05 and extra["source"] == "synthetic"
    assert "| probe | 2 | 1 |" in done.stdout and "pseudo mixup" in done.stdout
    assert (results / "mechanisms.png").stat().st_size > 0
    # a second invocation reads every cell back instead of training again
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and json.loads((results / "mechanisms.json").read_text())["results"] == rows
