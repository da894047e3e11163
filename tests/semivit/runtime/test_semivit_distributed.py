"""Two real gloo ranks on the CPU through ``accelerate launch``: same split on every rank,
synchronised gradients (identical parameters), evaluation equal to the one-process numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.reads import only_read

from semivit.cli import main
from semivit.config.load import load_config
from semivit.stages.evaluate import run_evaluate

TINY = [
    "data.name=digits",
    "data.image_size=8",
    "data.max_train=200",
    "data.max_test=101",  # odd: the last batch is padded on 2 ranks and must not count twice
    "data.labels_per_class=4",
    "model.name=vit_micro_patch4",
    "semi.epochs=1",
    "semi.batch_size=8",
    "semi.mu=2",
    "semi.tau=0.1",
    "semi.eval_every=0",
]


def test_two_cpu_ranks(tmp_path):
    one = tmp_path / "one"
    finetune = ["finetune", f"output_dir={one}", *TINY, "model.init=none", "finetune.epochs=2", "finetune.batch_size=16"]
    assert main(only_read("semivit", finetune, TINY)) == 0  # TINY's semi.* are for the semi run below
    finetuned = one / "stage1" / "finetune"
    ref = run_evaluate(load_config(None, [f"output_dir={one}", *TINY]), str(finetuned))

    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    helper = Path(__file__).resolve().parents[2] / "helpers" / "two_rank_check.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(helper), str(two), str(finetuned), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((two / "two_rank.json").read_text())
    assert r["world"] == 2
    assert r["same_split"] and r["different_batches"] and r["same_params"]
    # one process (finetune) and two (the check, then semi) read the same run split
    assert (two / "label_split.csv").read_text() == (one / "label_split.csv").read_text()
    assert json.loads((two / "label_split.json").read_text())["drawn_by"] == "check"  # semi reused it
    assert all(r["different_draws"].values()), r["different_draws"]  # one random stream per rank
    assert r["same_generation_noise"]
    assert r["eval"]["num_test"] == 101 == ref["num_test"]
    for key in ("top1", "top1_ema", "top5"):
        assert r["eval"][key] == pytest.approx(ref[key], abs=1e-9)
    assert r["semi_rc"] == 0
    m = json.loads((two / "stage1" / "semi" / "metrics.json").read_text())
    assert m["num_test"] == 101 and m["num_unlabeled"] == 160


@pytest.mark.parametrize("ok", [True, False])
def test_commands_leave_the_process_group(tmp_path, ok):
    """Ranks must destroy the group before the interpreter exits (gloo can abort in finalization
    otherwise); after a failed run it is closed without waiting for the other ranks."""
    code = (
        "import torch.distributed as dist\n"
        "from semivit.runtime.accelerator import leave_process_group\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        f"leave_process_group({ok})\n"
        "assert not dist.is_initialized()\n"
        "leave_process_group()\n"  # a second call, and a call without a group, do nothing
        "print('left')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "left", proc.stderr[-2000:]
