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


def test_generators_share_stage_one_and_get_their_own_cells(tmp_path):
    """--generators: each generator trains on the same stage-1 model and pseudo-labels (the second in a
    sibling folder of hard links, stage 1 not trained again) and has its own synthetic cells and facts."""
    enc_run = tmp_path / "enc"
    run_pretrain(load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={enc_run}"]))
    out, results = tmp_path / "mech", tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.mechanisms_mnist", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--out", str(out), "--results", str(results), "--labels", "2", "--seeds", "0", "--modes", "probe",
        "--k", "3", "--pool", "3", "--encoder", str(enc_run / "stage0" / "encoder.safetensors"),
        "--generators", "dit", "unet", "--name", "gens", "diffusion.hidden_size=32", "diffusion.depth=1",
        "diffusion.num_heads=2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((results / "gens.json").read_text())["results"][0]
    for key in ("probe/none", "probe/pseudo-real", "probe/synthetic@dit", "probe/synthetic@unet"):
        assert 0 <= row["cells"][key] <= 100, key
    assert "probe/synthetic" not in row["cells"]
    for g in ("dit", "unet"):
        facts = row["generators"][g]
        assert facts["train_diffusion_seconds"] > 0 and facts["texture"]["num_images"] == 3 * 10
    base, sibling = out / "l2_seed0", out / "l2_seed0_gen-unet"
    # the same stage-1 files, and the sibling's generator is a UNet, the run's own a DiT
    for f in ("stage1/semi/model_ema.safetensors", "stage1/pseudo_labels.csv"):
        assert (base / f).stat().st_ino == (sibling / f).stat().st_ino, f
    assert "UNet2DModel" in (sibling / "stage2" / "model" / "config.json").read_text()
    assert "DiT" in (base / "stage2" / "model" / "config.json").read_text()
    assert "unet − pseudo-real" in done.stdout and "real test digits" in done.stdout
    assert (results / "gens.png").stat().st_size > 0
    assert (results / "gens_grid_unet_l2_seed0.png").stat().st_size > 0


def test_from_run_reuses_the_pipeline_run(tmp_path):
    """--from-run: a finished pipeline run's stages are the benchmark run's own (nothing retrained), and
    its stage 3 is read back as the semi cell of the generator it was made with."""
    from dpt.pipeline import run_pipeline

    unet = ["diffusion.model=unet", "diffusion.unet_channels=[16,32,64]", "diffusion.unet_layers_per_block=1",
            "diffusion.unet_attention_levels=1", "generate.guidance_scale=1.5"]
    source = tmp_path / "run_seed0"
    run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={source}", *unet]))
    out, results = tmp_path / "mech", tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.mechanisms_mnist", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--out", str(out), "--results", str(results), "--labels", "2", "--seeds", "0", "--modes", "probe", "semi",
        "--semi-labels", "2", "--semi-sources", "synthetic", "--k", "4", "--pool", "4", "--generators", "unet",
        "--from-run", str(tmp_path / "run_seed{seed}"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((results / "mechanisms.json").read_text())["results"][0]
    base = out / "l2_seed0"
    for f in ("stage0/encoder.safetensors", "stage1/semi/model_ema.safetensors", "stage2/model/config.json"):
        assert (base / f).stat().st_ino == (source / f).stat().st_ino, f  # linked, not trained again
    stage3 = json.loads((source / "stage3" / "metrics.json").read_text())
    assert row["cells"]["semi/synthetic@unet"] == stage3.get("top1_ema", stage3.get("top1"))
    assert not (base / "bench" / "semi_synthetic@unet").exists()
    assert "stage 1b" not in done.stderr and "stage 0" not in done.stderr


def test_from_run_without_a_seed_placeholder_is_refused_for_several_seeds(tmp_path):
    """One finished run cannot stand for several seeds: the benchmark stops before it links anything."""
    cmd = [sys.executable, "-m", "benchmarks.mechanisms_mnist", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--out", str(tmp_path / "mech"), "--seeds", "0", "1", "--generators", "unet", "--from-run", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "one run per seed is needed" in done.stderr and "{seed}" in done.stderr
    assert not (tmp_path / "mech").exists()
