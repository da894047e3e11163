"""The trainer's hot path: no host sync per micro-batch (the non-finite flag lives on the device and
is read every train.nonfinite_every optimizer steps and at every epoch's end), yet a non-finite
loss never reaches a checkpoint; loaders pin memory only for a GPU; train.compile compiles in place."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from semivit.config.load import load_config
from semivit.errors import NonFiniteLoss
from semivit.runtime.loop import Trainer, pin_batches

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _trainer(tmp_path, n_items: int, *overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tensorboard=false", *overrides])
    trainer = Trainer(cfg, "toy", tmp_path / "toy", sections=("finetune",))
    loader = trainer.loader(TensorDataset(torch.randn(n_items, 4), torch.randn(n_items, 1)), 2)
    model = torch.nn.Linear(4, 1)
    model, loader = trainer.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01), loader)
    trainer.schedule(epochs=1, warmup_steps=0)
    return trainer, model, loader


def _count_host_reads(monkeypatch, trainer, model, loader) -> int:
    """Reads of a tensor's value by the host during ``fit`` (each one waits for the device)."""
    count = {"n": 0}
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            count["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def step(batch):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}

    trainer.fit(1, lambda epoch: loader, step, checkpoint_every=0)
    monkeypatch.undo()
    return count["n"]


def test_no_host_sync_per_micro_batch(tmp_path, monkeypatch):
    # the same epoch-end reads whether an epoch has 8 or 64 micro-batches: none per micro-batch
    few = _count_host_reads(monkeypatch, *_trainer(tmp_path / "a", 16, "train.nonfinite_every=1000"))
    many = _count_host_reads(monkeypatch, *_trainer(tmp_path / "b", 128, "train.nonfinite_every=1000"))
    assert many == few
    # reading the flag every 8 optimizer steps adds one read per 8 steps: 64 steps -> 8 reads
    every8 = _count_host_reads(monkeypatch, *_trainer(tmp_path / "c", 128, "train.nonfinite_every=8"))
    assert every8 - many == 64 // 8


def test_a_nonfinite_loss_between_reads_is_caught_before_the_checkpoint(tmp_path):
    trainer, model, loader = _trainer(tmp_path, 16, "train.nonfinite_every=1000")
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        return {"loss": loss * float("nan") if calls["n"] == 3 else loss}

    trainer.schedule(epochs=2, warmup_steps=0)
    with pytest.raises(NonFiniteLoss, match="loss is nan at epoch 1, optimizer step 2"):
        trainer.fit(2, lambda epoch: loader, step, checkpoint_every=1)
    assert calls["n"] == 8  # the epoch ran on (no sync), its end read the flag
    assert not (tmp_path / "toy" / "checkpoints").exists()  # the bad epoch was never saved


def test_pinned_memory_only_for_a_gpu(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert pin_batches(cfg, torch.device("cuda")) and not pin_batches(cfg, torch.device("cpu"))
    cfg.train.pin_memory = False
    assert not pin_batches(cfg, torch.device("cuda"))


def test_compile_keeps_parameter_names(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: called.append(type(self).__name__))
    trainer, model, _ = _trainer(tmp_path, 16, "train.compile=true")
    assert called == ["Linear"]
    assert set(trainer.accelerator.unwrap_model(model).state_dict()) == {"weight", "bias"}
