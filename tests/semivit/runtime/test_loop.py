"""The one training loop: non-finite losses, resume equal to an uninterrupted run, checkpoints that
are never unpickled, settings-bound resume, smoke caps."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from semivit.cli import main
from semivit.config.load import load_config
from semivit.errors import NonFiniteLoss
from semivit.runtime.loop import Trainer

TINY = [
    "data.name=digits",
    "data.image_size=8",
    "data.max_train=200",
    "data.max_test=60",
    "data.labels_per_class=4",
    "model.name=vit_micro_patch4",
    "model.init=none",
    "finetune.epochs=3",
    "finetune.batch_size=8",
    "finetune.eval_every=0",
    "tensorboard=false",
]


def toy_trainer(tmp_path, *overrides, name="toy"):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tensorboard=false", *overrides])
    trainer = Trainer(cfg, name, tmp_path / name, sections=("finetune",))
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = trainer.loader(data, 4)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, loader = trainer.prepare(model, opt, loader)
    trainer.schedule(epochs=3, warmup_steps=0)
    return trainer, model, loader


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, model, loader = toy_trainer(tmp_path)
    calls = {"n": 0}

    def step(batch):
        x, y = batch
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        return {"loss": loss * float("nan") if calls["n"] == 11 else loss}  # epoch 2, third step

    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit(3, lambda epoch: loader, step)
    msg = str(err.value)
    assert "toy: loss is nan at epoch 2, optimizer step 10" in msg and "epoch_1" in msg and "\n" not in msg
    assert (tmp_path / "toy" / "checkpoints" / "epoch_1" / "model.safetensors").is_file()
    before = torch.load(tmp_path / "toy" / "checkpoints" / "epoch_1" / "optimizer.pt", weights_only=True)
    assert before["scheduler"]["last_epoch"] == 8  # the checkpoint holds the state after epoch 1


def test_nonfinite_steps_can_be_skipped(tmp_path, caplog):
    trainer, model, loader = toy_trainer(tmp_path)
    trainer.skip_nonfinite = True
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        return {"loss": loss * float("inf") if calls["n"] == 2 else loss}

    trainer.fit(1, lambda epoch: loader, step)
    assert trainer.state.step == 7  # 8 micro-batches, one skipped
    assert "step skipped" in caplog.text


def test_smoke_caps_an_epoch_at_two_optimizer_steps(tmp_path):
    trainer, model, loader = toy_trainer(tmp_path, "smoke=true")
    assert trainer.micro_per_epoch == 2 and trainer.updates_per_epoch == 2


def cli(out, *args):
    return main([args[0], f"output_dir={out}", *TINY, *args[1:]])


def history(out):
    return json.loads((Path(out) / "stage1" / "finetune" / "history.json").read_text())


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Model, optimizer, schedule, EMA, every random stream and the loaders' shuffles resume."""
    assert cli(tmp_path / "a", "finetune") == 0
    assert cli(tmp_path / "b", "finetune", "stop_after_epoch=1") == 0
    assert (tmp_path / "b" / "stage1" / "finetune" / "checkpoints" / "epoch_1").is_dir()
    assert not (tmp_path / "b" / "stage1" / "finetune" / "metrics.json").exists()
    assert cli(tmp_path / "b", "finetune") == 0
    a, b = history(tmp_path / "a"), history(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ma = json.loads((tmp_path / "a" / "stage1" / "finetune" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "stage1" / "finetune" / "metrics.json").read_text())
    assert ma["top1_ema"] == mb["top1_ema"] and ma["top1"] == mb["top1"]


PAYLOAD = """
import os, pickle, sys
class P:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
with open(sys.argv[1], "wb") as f:
    pickle.dump(P(), f)
"""


def plant(path: Path, marker: Path) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", PAYLOAD, str(path), str(marker)], check=True)


def test_a_checkpoint_full_of_pickle_payloads_never_runs_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(out, "finetune", "stop_after_epoch=1") == 0
    ckpt = out / "stage1" / "finetune" / "checkpoints" / "epoch_1"
    marker = tmp_path / "PAYLOAD_RAN"
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.pt", "ema.safetensors", "train_state.json", "rng_0.pt"}
    for p in files:
        plant(p, marker)
    capsys.readouterr()
    assert cli(out, "finetune") == 2
    err = capsys.readouterr().err.strip()
    assert "could not be read safely" in err and "\n" not in err and "Traceback" not in err
    assert not marker.exists()
    # a replaced settings file makes the state foreign: the stage starts over instead
    plant(ckpt.parent / "settings.json", marker)
    assert cli(out, "finetune") == 0
    assert not marker.exists()
    assert (out / "stage1" / "finetune" / "metrics.json").is_file()


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, caplog):
    out = tmp_path / "run"
    assert cli(out, "finetune", "stop_after_epoch=1") == 0
    assert cli(out, "finetune", "finetune.lr=0.002") == 0
    assert "saved with other settings" in caplog.text
    assert [r["epoch"] for r in history(out)] == [1, 2, 3]


def test_stage_records_its_settings_when_it_finishes(tmp_path):
    """An interrupted rerun with new settings must not make the old weights look like the new
    settings' result to `dpt run` (the stage scripts leave no pipeline.json)."""
    from dpt.pipeline import plan

    out = tmp_path / "run"
    assert cli(out, "finetune") == 0
    assert cli(out, "finetune", "finetune.lr=0.002", "stop_after_epoch=1") == 0
    cfg = load_config(None, [f"output_dir={out}", *TINY, "finetune.lr=0.002"])
    reasons = {s.name: r for s, r in plan(cfg)}
    assert reasons["finetune"] == "settings changed"
    saved = (out / "stage1" / "finetune" / "config.yaml").read_text()
    assert "lr: 0.001" in saved and "lr: 0.002" not in saved
