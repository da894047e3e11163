"""``stop_after_epoch`` ends every training command of both command lines with exit code 0 and the
resume message; the same command without it resumes from the saved epoch and finishes."""

import json
import re
from pathlib import Path

import pytest

import dpt.cli
import semivit.cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _finetuned(run: Path) -> list[str]:
    """Stage 1a of ``run`` in one epoch: the classifier that semi and retrain start from."""
    assert semivit.cli.main(["finetune", "--config", TINY, f"output_dir={run}", "finetune.epochs=1"]) == 0
    return []


# command -> (main, command word, settings giving the stage 2 epochs, setup, folder of its history)
CASES = {
    "semivit pretrain": (semivit.cli.main, "pretrain", ["pretrain.epochs=2"], None, "stage0"),
    "semivit finetune": (semivit.cli.main, "finetune", ["finetune.epochs=2"], None, "stage1/finetune"),
    "semivit semi": (semivit.cli.main, "semi", ["semi.epochs=2"], _finetuned, "stage1/semi"),
    "dpt train-diffusion": (dpt.cli.main, "train-diffusion", ["labels=true", "epochs=2"], None, "stage2"),
    "dpt retrain": (
        dpt.cli.main, "retrain",
        ["mode=supervised", "source=none", "finetune.epochs=2", "init={run}/stage1/finetune"], _finetuned, "stage3",
    ),
    # the pipeline stops in its first stage of more than one epoch (fine-tuning: 2 in tiny.yaml)
    "dpt run": (dpt.cli.main, "run", [], None, "stage1/finetune"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stop_after_epoch_exits_0_and_the_next_call_resumes(name, tmp_path, capsys, caplog):
    main, command, settings, setup, folder = CASES[name]
    run = tmp_path / "run"
    if setup is not None:
        setup(run)
    args = [command, "--config", TINY, f"output_dir={run}", *(s.format(run=run) for s in settings)]
    capsys.readouterr()

    assert main([*args, "stop_after_epoch=1"]) == 0
    err = capsys.readouterr().err
    # the command's one line, after any progress bars
    assert re.search(rf"(^|\r|\n){name}: [\w-]+: stopped after epoch 1 \(stop_after_epoch=1\); run again to resume\n", err), err
    stage = run / folder
    assert not (stage / "metrics.json").exists()  # not finished
    assert (stage / "checkpoints").is_dir()  # the resumable state of epoch 1
    if name == "dpt run":
        assert not (run / "summary.json").exists()
        state = json.loads((run / "pipeline.json").read_text())
        assert "done" not in state["finetune"] and "semi" not in state  # stopped there, went no further

    caplog.clear()
    assert main(args) == 0
    assert "resumed from" in caplog.text and "(epoch 1," in caplog.text
    assert (stage / "metrics.json").is_file() and not (stage / "checkpoints").exists()
    history = json.loads((stage / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    if name == "dpt run":
        state = json.loads((run / "pipeline.json").read_text())
        assert all("done" in record for record in state.values()), state
