"""benchmarks/generator_mnist.py in its oracle mode on configs/tiny.yaml: a training variant, a
sampling-only variant that reuses the base generator, texture measures of both image sets, the
pixel-CNN judge and CAS, grids and a result JSON with provenance (the numbers mean nothing here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generator_benchmark_oracle_mode_on_tiny(tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    cmd = [
        sys.executable, "-m", "benchmarks.generator_mnist", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--n", "3", "--out", str(out), "--results", str(res), "--variant", "baseline:",
        "--variant", "late:generate.guidance_min_t=0.5",
        "--variant", "p2:diffusion.patch_size=2,diffusion.unet_channels=[8,16]",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((res / "generator_oracle_n3_seed0.json").read_text())
    assert saved["provenance"]["command"].startswith("python -m benchmarks.generator_mnist")
    rows = {r["variant"]: r for r in saved["results"]["rows"]}
    assert list(rows) == ["baseline", "late", "p2"]
    # the list value kept its commas; the sampling-only variant trained nothing of its own
    assert rows["p2"]["overrides"] == ["diffusion.patch_size=2", "diffusion.unet_channels=[8,16]"]
    assert "stage2_cpu_seconds" in rows["baseline"] and "stage2_cpu_seconds" in rows["p2"]
    assert "stage2_cpu_seconds" not in rows["late"] and rows["late"]["generate_cpu_seconds"] > 0
    for r in rows.values():
        assert r["texture_synthetic"]["num_images"] == 30 and r["texture_real"]["num_images"] > 30
        lo, hi = r["texture_real_spread"]["fragments"]
        assert 0 < lo <= hi
        assert 0 <= r["synthetic_class_acc"] <= 100 and 0 <= r["cas_synthetic"] <= 100
        assert (out / r["variant"] / "real_vs_synthetic.png").stat().st_size > 0
    assert rows["p2"]["cas_real"] == rows["baseline"]["cas_real"]  # one real reference for all variants
    assert (res / "grids_oracle_n3_seed0.png").stat().st_size > 0
    assert "isolated px %" in done.stdout
