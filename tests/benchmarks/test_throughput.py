"""benchmarks/throughput.py: the --small run on the CPU writes sane rows with their provenance;
FLOP counting and peaks."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _module():
    return importlib.import_module("benchmarks.throughput")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "small.json"
    # a process of its own: the benchmark makes its own Accelerator (a per-process singleton)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    args = ["--small", "--peak-tflops", "2", "--mixup-repeats", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(out.read_text())
    provenance = written["provenance"]
    assert provenance["command"] == "python -m benchmarks.throughput " + " ".join(args)
    assert provenance["commit"] and "CPU cores" in provenance["machine"] and provenance["date"]
    return written["results"], proc.stdout


def test_small_run_rows_and_numbers(small_run):
    result, stdout = small_run
    assert result["device_type"] == "cpu" and result["precision"] == "fp32" and result["small"]
    assert result["peak_tflops"] == 2 and result["peak_source"] == "--peak-tflops"
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {
        "vit_finetune", "semivit_step", "mae_pretrain", "dit_train", "dit_sample", "ditpipeline_sample",
        "pseudo_mixup_224px", "pseudo_mixup_28px",
        # row g: the Trainer's hot path one change at a time (CUDA-only changes and compile not on a CPU)
        "loop_sync_every_step", "loop_flag_every_50", "loop_adamw_for_loop", "loop_adamw_foreach", "loop_adamw_fused",
    }
    for r in result["rows"]:
        assert r["name"] in stdout  # the printed table has every row
        assert r["images_per_s"] > 0 and math.isfinite(r["images_per_s"]) and r["step_ms"] > 0
        # images/s is the batch over the step time
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3), rel=1e-6)
    for name in ("vit_finetune", "semivit_step", "mae_pretrain", "dit_train", "dit_sample", "ditpipeline_sample"):
        r = rows[name]
        assert r["tflop_per_step"] > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2)
        assert 0 < r["mfu"] < 1
        # attention went through PyTorch's fused SDPA, and its FLOPs were counted
        assert any("scaled_dot_product" in op for op in r["attention_ops"]), r["attention_ops"]
    for name in ("vit_finetune", "semivit_step", "mae_pretrain", "dit_train", "dit_sample"):
        assert rows[name]["sdpa"] is True


def test_small_run_flops_are_consistent(small_run):
    rows = {r["name"]: r for r in small_run[0]["rows"]}
    ft, semi = rows["vit_finetune"], rows["semivit_step"]
    assert semi["labeled"] == 2 and semi["unlabeled"] == 10 and semi["batch"] == ft["batch"] == 12
    # the same student batch plus a teacher forward over the 10 weak views (~1/3 of a training
    # pass per image): more than the supervised step, less than twice it
    assert ft["tflop_per_step"] < semi["tflop_per_step"] < 2 * ft["tflop_per_step"]
    # the same 25 guided passes of the same model; the pipeline adds only a tiny VAE decode
    ours, pipe = rows["dit_sample"], rows["ditpipeline_sample"]
    assert pipe["tflop_per_step"] == pytest.approx(ours["tflop_per_step"], rel=0.05)
    assert pipe["ours_speedup"] > 0


def test_small_run_pseudo_mixup_rows(small_run):
    rows = {r["name"]: r for r in small_run[0]["rows"]}
    for name, shape in (("pseudo_mixup_224px", [64, 3, 224, 224]), ("pseudo_mixup_28px", [320, 1, 28, 28])):
        r = rows[name]
        assert r["shape"] == shape and r["threads"] == 1
        assert r["images_equal_to_loop"] is True and r["target_max_abs_diff"] < 1e-6
        assert r["loop_ms"] > 0 and r["speedup_vs_loop"] == pytest.approx(r["loop_ms"] / r["step_ms"])


def test_flop_counter_counts_cpu_attention():
    mod = _module()
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    flops, ops = mod.count_step(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    forward = 2 * (2 * 2 * 3 * 16 * 16 * 8)  # QK^T and PV, 2 FLOPs per multiply-add
    # PyTorch's backward formula (used for its CUDA kernels too) counts 5 matmuls: dV, dP, the
    # recomputed scores, dQ and dK
    assert flops == pytest.approx(forward + 2.5 * forward)
    assert ops


def test_peak_table_matches_device_names():
    mod = _module()
    peak = mod.table_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak("NVIDIA H200", "bf16") == 989.4
    assert peak("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak("NVIDIA L40S", "bf16") == 362.1
    assert peak("NVIDIA L4", "bf16") == 121.0
    assert peak("NVIDIA GeForce RTX 4090", "fp32") == 82.6
    assert peak("NVIDIA A10G", "bf16") is None  # unknown: MFU only with --peak-tflops
    assert peak("Tesla V100-SXM2-16GB", "bf16") is None


def test_per_sample_loop_matches_batched_on_a_seed():
    mod = _module()
    from semivit.stages.ssl import prob_pseudo_mixup

    x = torch.randn(16, 3, 20, 20)
    conf, hard = torch.rand(16) * 0.5 + 0.5, torch.randint(0, 4, (16,))
    a = prob_pseudo_mixup(x, conf, hard, 4, 0.7, generator=torch.Generator().manual_seed(2))
    b = mod.per_sample_pseudo_mixup(x, conf, hard, 4, 0.7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    assert torch.allclose(a["target"], b["target"], rtol=0, atol=1.2e-7)
