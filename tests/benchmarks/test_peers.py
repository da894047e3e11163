"""benchmarks/peers.py: the --small run writes every promised cell with its provenance, the paired
differences against Semi-ViT are the per-seed differences, a re-run reads its cells back, USB cells
are skipped with a message where semilearn is missing and run where it is installed (PEERS_PYTHON or
this Python)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peers import markdown, paired
from benchmarks.peers_usb import usb_net
from semivit.config.schema import ModelConfig
from semivit.models.classifier import create_classifier

ROOT = Path(__file__).resolve().parents[2]
CELLS = ["finetune", "semivit", "semivit-da", "fixmatch", "convnext"]
VARIANT = ["--variant", "tau9:semi.tau=0.9,semi.dist_align=uniform"]


def _run(out: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [python, "-m", "benchmarks.peers", "--small", "--out", str(out), "--results", str(out / "r.json"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_small_run_without_usb_writes_cells_pairs_and_resumes(tmp_path):
    if importlib.util.find_spec("semilearn") is not None:
        pytest.skip("semilearn is installed in this Python: the USB cells would run, not be skipped")
    proc = _run(tmp_path, "--cells", *CELLS, *VARIANT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fixmatch: not measured: USB cell skipped: the semilearn package is not installed" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["provenance"]["command"].startswith("python -m benchmarks.peers --small")
    cells = data["results"]["cells"]
    assert "semilearn package is not installed" in data["results"]["skipped"]["fixmatch"]
    assert set(cells) == {"finetune/seed0", "semivit/seed0", "semivit-da/seed0", "convnext/seed0", "semivit:tau9/seed0"}
    for key in ("semivit/seed0", "semivit-da/seed0", "convnext/seed0", "semivit:tau9/seed0"):
        c = cells[key]
        assert c["steps"] == 2 and c["images_per_step"] == 8 * (1 + 2)  # tiny: semi.batch_size 8, mu 2
        assert 0 <= c["top1"] <= 100 and c["wall_s"] > 0 and c["images_per_s"] > 0
    assert cells["convnext/seed0"]["model"] == "convnext_atto"
    # a variant: the semi stage with its own settings, from the same fine-tuned model, paired like the rest
    semi_cfg = (tmp_path / "seed0" / "vit" / "semivit-tau9" / "config.yaml").read_text()
    assert "tau: 0.9" in semi_cfg and "dist_align: uniform" in semi_cfg
    assert cells["semivit:tau9/seed0"]["settings"] == ["semi.tau=0.9", "semi.dist_align=uniform"]
    assert list(data["results"]["paired"])[-1] == "semivit:tau9"
    pairs = data["results"]["paired"]
    assert pairs["semivit-da"]["diff_vs_semivit_mean"] == pytest.approx(
        cells["semivit-da/seed0"]["top1"] - cells["semivit/seed0"]["top1"])
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert (tmp_path / "label_split.csv").is_file()
    # a second run reads every cell back instead of training again
    again = _run(tmp_path, "--cells", *CELLS, *VARIANT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["results"]["cells"] == cells


def _usb_python() -> str | None:
    if os.environ.get("PEERS_PYTHON"):
        return os.environ["PEERS_PYTHON"]
    return sys.executable if importlib.util.find_spec("semilearn") is not None else None


@pytest.mark.skipif(_usb_python() is None, reason="semilearn not installed (pip install -e .[peers], or PEERS_PYTHON)")
def test_small_run_with_usb_measures_its_cells(tmp_path):
    proc = _run(tmp_path, "--cells", "finetune", "semivit", "fixmatch", "softmatch", "--usb-python", _usb_python())
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "r.json").read_text())["results"]["cells"]
    for alg in ("fixmatch", "softmatch"):
        c = cells[f"{alg}/seed0"]
        assert c["steps"] == cells["semivit/seed0"]["steps"] == 2
        assert c["images_per_step"] == cells["semivit/seed0"]["images_per_step"]
        assert 0 <= c["top1"] <= 100 and c["runner"].startswith("semilearn")


def test_paired_differences_are_per_seed_and_table_shows_them():
    done = {
        "semivit/seed0": {"top1": 80.0, "wall_s": 10, "images_per_s": 5},
        "semivit/seed1": {"top1": 70.0, "wall_s": 10, "images_per_s": 5},
        "fixmatch/seed0": {"top1": 82.0, "wall_s": 20, "images_per_s": 2},
        "fixmatch/seed1": {"top1": 76.0, "wall_s": 20, "images_per_s": 2},
        "resnet18/seed1": {"top1": 60.0, "wall_s": 5, "images_per_s": 9},
    }
    t = paired(done)
    assert t["fixmatch"]["diff_vs_semivit_mean"] == pytest.approx(4.0)  # (+2, +6)
    assert t["fixmatch"]["diff_vs_semivit_sd"] == pytest.approx(2.8284, abs=1e-3)
    assert t["resnet18"]["diff_seeds"] == [1] and t["resnet18"]["diff_vs_semivit_mean"] == pytest.approx(-10.0)
    assert "flexmatch" not in t and "diff_vs_semivit_mean" not in t["semivit"]
    table = markdown(t)
    assert "| fixmatch | 2 | 79.0 ± 4.2 | +4.0 ± 2.8 |" in table


def test_usb_network_interface_keeps_the_classifier():
    net = create_classifier(ModelConfig(name="vit_micro_patch4", drop_path=0.0), 10, 16, 1).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
    keys = list(net.state_dict())
    wrapped = usb_net(net)
    with torch.no_grad():
        out = wrapped(x)
        feat = wrapped(x, only_feat=True)
        assert torch.allclose(out["logits"], ref, atol=1e-5)
        assert torch.allclose(wrapped(feat, only_fc=True), ref, atol=1e-5)
    assert out["feat"].shape == (3, 64) and list(wrapped.state_dict()) == keys
    assert "blocks" in wrapped.group_matcher()


def test_from_run_reuses_each_seeds_stage_one_and_refuses_other_settings(tmp_path):
    """--from-run: the run's split, fine-tuned model, Semi-ViT and stage 3 are the seed's split,
    finetune, semivit and dpt cells (read back, not trained); semivit-da starts from the run's
    fine-tuned model; a run made with other settings is refused with the setting named, and a run
    without stage 3 has no dpt cell, said in the output."""
    from dpt.pipeline import run_pipeline
    from semivit.config.load import load_config

    small = ["data.max_train=120", "data.max_test=40", "finetune.epochs=1", "semi.epochs=1", "semi.steps_per_epoch=2"]
    run = tmp_path / "run_seed0"
    run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={run}", "pipeline.judge=false", *small]),
                 until="retrain")
    proc = _run(tmp_path / "out", "--cells", "finetune", "semivit", "semivit-da", "dpt",
                "--from-run", str(tmp_path / "run_seed{seed}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "r.json").read_text())["results"]
    cells = data["cells"]
    semi = json.loads((run / "stage1" / "semi" / "metrics.json").read_text())
    assert cells["semivit/seed0"]["top1"] == semi["top1_ema"]
    assert cells["semivit/seed0"]["reused"] == str(run / "stage1" / "semi")
    assert cells["finetune/seed0"]["reused"] == str(run / "stage1" / "finetune")
    assert "reused" not in cells["semivit-da/seed0"] and cells["semivit-da/seed0"]["steps"] == 2
    assert cells["semivit-da/seed0"]["split_sha256"] == cells["semivit/seed0"]["split_sha256"]
    assert data["settings"]["from_run"].endswith("run_seed{seed}")
    assert (tmp_path / "out" / "seed0" / "label_split.csv").read_text() == (run / "label_split.csv").read_text()
    stage3 = json.loads((run / "stage3" / "metrics.json").read_text())
    state = json.loads((run / "pipeline.json").read_text())
    dpt = cells["dpt/seed0"]
    assert dpt["top1"] == stage3.get("top1_ema", stage3["top1"]) and dpt["reused"] == str(run / "stage3")
    assert dpt["stage_seconds"]["retrain"] == state["retrain"]["seconds"]
    assert dpt["wall_s"] == pytest.approx(sum(state[s]["seconds"] for s in
                                              ("semi", "pseudo-label", "train-diffusion", "generate", "retrain")))
    assert "dpt" in data["paired"] and data["paired"]["dpt"]["diff_seeds"] == [0]
    assert "stages_without_seconds" not in dpt
    # a stage whose seconds the pipeline did not record (run on its own) is named, not counted as 0 s
    del state["generate"]["seconds"]
    (run / "pipeline.json").write_text(json.dumps(state))
    partial = _run(tmp_path / "out4", "--cells", "dpt", "--from-run", str(tmp_path / "run_seed{seed}"))
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "wall seconds leave out generate" in partial.stdout
    dpt4 = json.loads((tmp_path / "out4" / "r.json").read_text())["results"]["cells"]["dpt/seed0"]
    assert dpt4["stages_without_seconds"] == ["generate"] and dpt4["stage_seconds"]["generate"] is None
    assert dpt4["wall_s"] == pytest.approx(dpt["wall_s"] - dpt["stage_seconds"]["generate"])
    assert not (tmp_path / "out" / "seed0" / "vit" / "stage1" / "finetune").exists()  # not fine-tuned again
    # --init none: the run gives its split only; fine-tuning and Semi-ViT are trained from scratch
    scratch = _run(tmp_path / "out5", "--cells", "finetune", "semivit", "dpt", "--init", "none",
                   "--from-run", str(tmp_path / "run_seed{seed}"))
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    res5 = json.loads((tmp_path / "out5" / "r.json").read_text())["results"]
    assert res5["settings"]["init"] == "none" and "dpt: not measured" in scratch.stdout
    assert not any("reused" in c for c in res5["cells"].values())
    ft_cfg = (tmp_path / "out5" / "seed0" / "vit" / "stage1" / "finetune" / "config.yaml").read_text()
    assert "init: none" in ft_cfg
    assert res5["cells"]["semivit/seed0"]["split_sha256"] == cells["semivit/seed0"]["split_sha256"]
    # other settings than the run's: refused, nothing measured
    other = _run(tmp_path / "out2", "--cells", "semivit", "--from-run", str(tmp_path / "run_seed{seed}"), "semi.tau=0.9")
    assert other.returncode != 0 and "not a finished semi stage" in other.stderr
    assert not (tmp_path / "out2" / "r.json").exists()
    # a run that stopped after stage 1: the dpt cell is skipped with the command that makes it
    (run / "stage3" / "metrics.json").unlink()
    again = _run(tmp_path / "out3", "--cells", "semivit", "dpt", "--from-run", str(tmp_path / "run_seed{seed}"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dpt: not measured:" in again.stdout and "has no retrain stage finished" in again.stdout
    results = json.loads((tmp_path / "out3" / "r.json").read_text())["results"]
    assert "dpt/seed0" not in results["cells"] and list(results["skipped"]) == ["dpt"]
    assert "split_sha256: not measured" not in again.stdout


def _cell(top1: float, split: str = "a") -> dict:
    return {"top1": top1, "wall_s": 10.0, "images_per_s": 9.6, "steps": 4, "images_per_step": 24, "split_sha256": split}


def test_merge_joins_cells_made_side_by_side_and_refuses_another_study(tmp_path):
    from benchmarks.peers import main
    from benchmarks.record import write_result

    settings = {"config": "c.yaml", "from_run": "runs/r{seed}", "num_labeled": 20, "init": "run", "overrides": []}
    one = write_result(tmp_path / "one.json", {"settings": settings, "cells": {
        "semivit/seed0": _cell(70.0), "softmatch/seed0": _cell(72.5), "skipped": {"dpt": "not finished"}}},
        argv=["python -m benchmarks.peers", "--seeds", "0"])
    two = write_result(tmp_path / "two.json", {"settings": settings, "cells": {
        "semivit/seed1": _cell(60.0, "b"), "softmatch/seed1": _cell(61.0, "b"), "semivit/seed0": _cell(70.0)}},
        argv=["python -m benchmarks.peers", "--seeds", "1"])
    target = tmp_path / "all.json"
    assert main(["--merge", str(one), str(two), "--results", str(target), "--conditions", "two jobs"]) == 0
    data = json.loads(target.read_text())
    assert set(data["results"]["cells"]) == {"semivit/seed0", "softmatch/seed0", "semivit/seed1", "softmatch/seed1"}
    pair = data["results"]["paired"]["softmatch"]
    assert pair["diff_vs_semivit_mean"] == pytest.approx((2.5 + 1.0) / 2) and pair["diff_seeds"] == [0, 1]
    assert data["provenance"]["cells_made_by"] == ["python -m benchmarks.peers --seeds 0",
                                                   "python -m benchmarks.peers --seeds 1"]
    assert data["provenance"]["conditions"] == "two jobs" and target.with_suffix(".png").is_file()
    # another study, a cell that disagrees, or a seed on another split is refused, and the file is kept
    before = target.read_bytes()
    other = write_result(tmp_path / "other.json", {"settings": {**settings, "num_labeled": 100}, "cells": {}})
    clash = write_result(tmp_path / "clash.json", {"settings": settings, "cells": {"semivit/seed0": _cell(71.0)}})
    moved = write_result(tmp_path / "moved.json", {"settings": settings, "cells": {"fixmatch/seed1": _cell(59.0, "c")}})
    for bad, words in ((other, "other settings"), (clash, "different top-1"), (moved, "another split")):
        with pytest.raises(SystemExit, match=words):
            main(["--merge", str(bad), "--results", str(target)])
    assert target.read_bytes() == before
    # a later merge adds its conditions after the earlier ones (and does not repeat them)
    late = write_result(tmp_path / "late.json", {"settings": settings, "cells": {"fixmatch/seed1": _cell(62.0, "b")}})
    assert main(["--merge", str(late), "--results", str(target), "--conditions", "alone, two threads"]) == 0
    assert json.loads(target.read_text())["provenance"]["conditions"] == "two jobs; alone, two threads"
    assert main(["--merge", str(late), "--results", str(target), "--conditions", "two jobs"]) == 0
    assert json.loads(target.read_text())["provenance"]["conditions"] == "two jobs; alone, two threads"


def test_merge_refuses_what_it_cannot_merge(tmp_path, capsys):
    from benchmarks.peers import main

    not_results = tmp_path / "notes.json"
    not_results.write_text('{"cells": {}}')
    with pytest.raises(SystemExit, match="notes.json' is not a results file"):
        main(["--merge", str(not_results), "--results", str(tmp_path / "all.json")])
    with pytest.raises(SystemExit, match="missing.json' not found"):
        main(["--merge", str(tmp_path / "missing.json"), "--results", str(tmp_path / "all.json")])
    for argv, words in ((["--merge", "a.json"], "--merge needs --results"),
                        (["--merge", "a.json", "--results", "b.json", "--from-run", "r{seed}"], "--merge trains nothing"),
                        (["--conditions", "two jobs"], "--conditions goes with --merge"),
                        (["--variant", "x:data.max_train=3"], "'data.max_train=3' is not a semi.KEY=VALUE setting"),
                        (["--variant", "x"], "write NAME:semi.KEY=VALUE"),
                        (["--variant", "x:semi.tau=1", "--variant", "x:semi.tau=0"], "'x' is given twice")):
        with pytest.raises(SystemExit):
            main(argv)
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--variant x: unknown setting 'semi.tauu'"):  # before any cell trains
        main(["--small", "--out", str(tmp_path / "v"), "--variant", "x:semi.tauu=0.9"])
    assert not (tmp_path / "all.json").exists() and not (tmp_path / "v").exists()


def test_variant_alone_trains_only_the_variants_and_their_start():
    from benchmarks.peers import ALL_CELLS, parse

    assert parse([]).cells == list(ALL_CELLS)
    assert parse(["--variant", "t:semi.tau=0.9"]).cells == ["finetune"]  # not every peer beside it
    assert parse(["--variant", "t:semi.tau=0.9", "--cells", "semivit"]).cells == ["semivit"]
