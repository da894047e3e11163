"""The one training loop of every training stage (MAE pre-training, fine-tuning, Semi-ViT, the
diffusion model, stage-3 retraining).

A stage hands the :class:`Trainer` its model, optimizer, loaders and a step function that returns
the losses of one micro-batch; the trainer owns everything else: epochs and optimizer steps,
gradient accumulation, the non-finite policy (a flag on the device, read every
``train.nonfinite_every`` optimizer steps and at every epoch's end, so never a host sync per
micro-batch and never a checkpoint after a non-finite loss), ``stop_after_epoch``, seeded loaders, one random
stream per rank, resumable checkpoints that are never unpickled, progress bars, the history,
``curves.png`` and TensorBoard, and the order in which a finished stage writes its files.

Counting rule: batch sizes are per process (a section's ``global_batch`` is turned into them by
semivit.config.scaling before any stage starts). An epoch is one pass over the data by all processes
together, so each process takes ``len(data) / (processes x batch)`` micro-batches; an optimizer
step is ``grad_accum`` micro-batches, and the lr schedule counts optimizer steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from semivit.config.load import save_config
from semivit.config.scaling import check_launch
from semivit.config.schema import Config, to_dict
from semivit.errors import CheckpointError, NonFiniteLoss, StopRequested
from semivit.files import atomic_write_json, load_weights, save_weights
from semivit.runtime.accelerator import (
    TrainState,
    finish_trackers,
    latest_checkpoint,
    make_accelerator,
    plot_curves,
    warmup_cosine,
)
from semivit.runtime.layout import CHECKPOINTS, CONFIG, CURVES, HISTORY, METRICS

logger = logging.getLogger("semivit")

SETTINGS_FILE = "settings.json"  # in checkpoints/: the settings the resumable state belongs to
SMOKE_UPDATES = 2  # optimizer steps per epoch in smoke mode


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def seed_rank_stream(seed: int, rank: int) -> None:
    """Give each rank its own random stream for training (noise, timesteps, masks, mixup, dropout,
    augmentation). Rank 0 keeps the stream the run seed started, so a single-process run draws the
    same numbers whatever the launch; rank r > 0 continues from a seed derived from (seed, r).
    What must agree across ranks does not use these streams: the labeled split has its own
    generator, generated images their own seeds, and the loaders' shuffles a shared generator."""
    if rank > 0:
        s = rank_seed(seed, rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)


def _process_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def seed_worker(worker_id: int) -> None:
    """Loader workers: numpy and ``random`` follow torch's per-worker seed; on rank r > 0 that seed
    is moved to the rank's own stream (the loader seeds are shared by all ranks)."""
    s = torch.initial_seed() % 2**32
    rank = _process_rank()
    if rank > 0:
        s = (s + rank_seed(s, rank)) % 2**32
        torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------------------------
# Safe checkpoint files
# --------------------------------------------------------------------------------------------


def _is_tensor_dict(state) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _save_state_file(folder: Path, name: str, state) -> None:
    """Tensors only: safetensors; tensors mixed with plain values: torch.save, read back with
    ``weights_only=True`` (no object of any class is ever unpickled)."""
    if _is_tensor_dict(state):
        save_weights(state, folder / f"{name}.safetensors")
    else:
        torch.save(state, folder / f"{name}.pt")


def _load_state_file(folder: Path, name: str):
    st, pt = folder / f"{name}.safetensors", folder / f"{name}.pt"
    try:
        if st.is_file():
            return load_weights(st)
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle payload, a truncated file, anything not plain tensors
        path = st if st.is_file() else pt
        raise CheckpointError(
            f"checkpoint file '{path}' could not be read safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"delete '{folder}' to start the stage over, or set resume=false"
        ) from e
    raise CheckpointError(f"checkpoint '{folder}' lacks {name}.safetensors / {name}.pt; delete the folder to start over")


def _rng_state(generators: list[torch.Generator]) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "loaders": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for g, s in zip(generators, state.get("loaders", []), strict=False):
        g.set_state(s)


def _read_settings(path: Path) -> str | None:
    """The settings hash a checkpoint folder was saved with; None when missing or unreadable."""
    try:
        return json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def settings_hash(cfg: Config, sections: tuple[str, ...]) -> str:
    d = to_dict(cfg)
    relevant = {k: d[k] for k in ("seed", "smoke", "checkpoint")} | {s: d[s] for s in sections}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def pin_batches(cfg: Config, device: torch.device) -> bool:
    """Page-locked loader batches where they help: a CUDA device (``train.pin_memory``)."""
    return bool(cfg.train.pin_memory) and device.type == "cuda"


def optimizer_update(accelerator, model, optimizer, scheduler, clip_grad: float = 0.0) -> None:
    """After ``backward``: clip (on the micro-batch that syncs), step, schedule, zero. Inside
    ``accelerator.accumulate`` the optimizer skips the micro-batches that do not sync."""
    if clip_grad > 0 and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class Trainer:
    """Owns a training stage from its Accelerator to its final files.

    Use: ``prepare`` (model, optimizer, loaders) -> ``schedule`` -> ``track`` (EMA and other state
    to checkpoint) -> ``resume`` -> ``fit`` -> ``finish``.
    """

    def __init__(
        self,
        cfg: Config,
        name: str,
        stage_dir: Path,
        *,
        sections: tuple[str, ...],
        amp: str = "no",
        grad_accum: int = 1,
        clip_grad: float = 0.0,
        skip_nonfinite: bool = False,
        nonfinite_hint: str = "",
    ):
        self.cfg, self.name, self.stage_dir = cfg, name, Path(stage_dir)
        self.grad_accum, self.clip_grad = max(1, grad_accum), clip_grad
        self.skip_nonfinite, self.nonfinite_hint = skip_nonfinite, nonfinite_hint
        self.settings = settings_hash(cfg, sections)
        check_launch(cfg, sections)  # a global batch this launch cannot reach stops here, before any work
        self.accelerator = make_accelerator(cfg, self.stage_dir, amp, grad_accum)
        self.state = TrainState()
        self._tracked: dict[str, object] = {}
        self._generators: list[torch.Generator] = []
        self.model = self.optimizer = self.scheduler = None
        self.micro_per_epoch = self.updates_per_epoch = 0
        self.history_title = name
        self.check_every = max(1, cfg.train.nonfinite_every)
        self._first_bad: torch.Tensor | None = None  # (step, epoch, loss) of the first non-finite loss, on the device
        if self.accelerator.is_main_process:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if cfg.tensorboard and self.accelerator.log_with:
            self.accelerator.init_trackers(name)
        self._start = time.time()
        self._before = 0.0

    # ---- set-up ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def loader(self, dataset, batch_size: int, shuffle: bool = True, drop_last: bool = True) -> DataLoader:
        """A loader whose shuffle comes from its own generator seeded by the run seed (shared by the
        ranks, so the distributed sampler splits one permutation), saved with the checkpoint."""
        g = torch.Generator()
        g.manual_seed(self.cfg.seed)
        self._generators.append(g)
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last and len(dataset) >= batch_size,
            num_workers=workers,
            worker_init_fn=seed_worker,
            generator=g,
            persistent_workers=workers > 0,  # workers live across epochs instead of restarting each one
            pin_memory=pin_batches(self.cfg, self.device),  # page-locked: the copy to the GPU does not block
        )

    def prepare(self, model, optimizer, *loaders, micro_steps: int | None = None):
        """Wrap model, optimizer and loaders for the devices and ranks. ``micro_steps``: micro-batches
        per process per epoch (default: the length of the first prepared loader)."""
        if self.cfg.train.compile:
            # in place (nn.Module.compile): parameter names, state dicts and the EMA see the same module
            model.compile()
        model, optimizer, *loaders = self.accelerator.prepare(model, optimizer, *loaders)
        self.model, self.optimizer = model, optimizer
        micro = micro_steps if micro_steps is not None else (len(loaders[0]) if loaders else 1)
        if self.cfg.smoke:
            micro = min(micro, SMOKE_UPDATES * self.grad_accum)
        self.micro_per_epoch = max(1, micro)
        self.updates_per_epoch = math.ceil(self.micro_per_epoch / self.grad_accum)
        n = self.accelerator.num_processes
        per = [int(getattr(ld, "total_batch_size", 0) or ld.batch_size or 0) // n for ld in loaders]
        logger.info(
            "%s: %d process(es) on %s, precision %s; global batch %d (%s per process x %d x %d accumulation), "
            "%d optimizer steps per epoch",
            self.name, n, self.device.type, self.accelerator.mixed_precision, sum(per) * n * self.grad_accum,
            "+".join(map(str, per)), n, self.grad_accum, self.updates_per_epoch,
        )
        return (model, *loaders)

    def schedule(self, epochs: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
        """Linear warm-up and cosine decay over ``epochs`` x the optimizer steps of an epoch."""
        self.scheduler = warmup_cosine(self.optimizer, warmup_steps, epochs * self.updates_per_epoch, min_lr_ratio)

    def track(self, **objects) -> None:
        """Objects with ``state_dict``/``load_state_dict`` saved and resumed with the stage (EMA
        models, distribution alignment, ...)."""
        self._tracked.update(objects)

    def resume(self) -> bool:
        """Continue from the last checkpoint when it exists and was made with the same settings."""
        ckpt = latest_checkpoint(self.stage_dir) if self.cfg.resume else None
        if ckpt is None:
            return False
        made_with = _read_settings(ckpt.parent / SETTINGS_FILE)
        if made_with != self.settings:
            logger.warning("%s: ignoring %s, saved with other settings; starting over", self.name, ckpt)
            self.accelerator.wait_for_everyone()
            if self.is_main:
                shutil.rmtree(ckpt.parent, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return False
        self._load(ckpt)
        self._before = self.state.history[-1].get("seconds", 0.0) if self.state.history else 0.0
        logger.info("%s: resumed from %s (epoch %d, step %d)", self.name, ckpt, self.state.epoch, self.state.step)
        return True

    @property
    def seconds(self) -> float:
        return self._before + time.time() - self._start

    # ---- the loop ----------------------------------------------------------------------------

    def fit(
        self,
        epochs: int,
        batches: Callable[[int], Iterable],
        step: Callable[[object], dict[str, torch.Tensor]],
        *,
        on_update: Callable[[int], None] | None = None,
        end_epoch: Callable[[dict], None] | None = None,
        checkpoint_every: int = 1,
        log_every: int = 1,
    ) -> None:
        """Train from ``state.epoch`` to ``epochs``. ``batches(epoch)`` yields the micro-batches of
        an epoch, ``step(batch)`` returns its losses (``loss`` is the one optimised; the others are
        logged), ``on_update(step)`` runs after every optimizer step (EMA, sample grids),
        ``end_epoch(row)`` adds the stage's own numbers to the epoch's row (evaluation, statistics)."""
        acc = self.accelerator
        if self.state.epoch == 0:  # a resumed run has restored each rank's own stream instead
            seed_rank_stream(self.cfg.seed, acc.process_index)
        for epoch in range(self.state.epoch, epochs):
            self.model.train()
            sums: dict[str, torch.Tensor] = {}
            count = 0
            bar = tqdm(
                total=self.micro_per_epoch,
                desc=f"{self.name} {epoch + 1}/{epochs}",
                leave=False,
                disable=not acc.is_local_main_process,
            )
            source = iter(batches(epoch))
            for _ in range(self.micro_per_epoch):
                batch = next(source, None)
                if batch is None:
                    break
                with acc.accumulate(self.model):
                    losses = step(batch)
                    loss = losses["loss"]
                    if self.skip_nonfinite:
                        # skipping a step needs the answer before the update: one host sync per micro-step
                        if not self._all_finite(loss):
                            self._nonfinite(loss, epoch)
                            self.optimizer.zero_grad(set_to_none=True)
                            count += 1
                            bar.update(1)
                            continue
                    else:
                        self._flag_nonfinite(loss, epoch)  # on the device; read every nonfinite_every steps
                    acc.backward(loss)
                    optimizer_update(acc, self.model, self.optimizer, self.scheduler, self.clip_grad)
                if acc.sync_gradients:
                    if on_update is not None:
                        on_update(self.state.step)
                    self.state.step += 1
                    if self.state.step % self.check_every == 0:
                        bar.set_postfix(loss=f"{self._check_nonfinite(loss):.4f}")
                for k, v in losses.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                bar.update(1)
            bar.close()
            self._check_nonfinite()  # every epoch, so before every checkpoint and before the stage's files
            self.state.epoch = epoch + 1
            row: dict = {"epoch": self.state.epoch}
            if sums:
                keys = list(sums)
                means = acc.reduce(torch.stack([sums[k] for k in keys]) / max(1, count), "mean").tolist()
                row.update(zip(keys, means, strict=True))
            row["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
            row["step"] = self.state.step
            if end_epoch is not None:
                end_epoch(row)
            row["seconds"] = self.seconds
            self.state.history.append(row)
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}, step=self.state.epoch)
            if self.state.epoch in (1, epochs) or self.state.epoch % max(1, log_every) == 0 or "top1" in row:
                logger.info("%s epoch %d/%d %s", self.name, self.state.epoch, epochs, _fmt(row))
            if self.state.epoch < epochs:
                if checkpoint_every > 0 and self.state.epoch % checkpoint_every == 0:
                    self.save_checkpoint()
                stop = self.cfg.stop_after_epoch
                if stop and self.state.epoch >= stop:
                    raise StopRequested(
                        f"{self.name}: stopped after epoch {self.state.epoch} (stop_after_epoch={stop}); run again to resume"
                    )

    def _flag_nonfinite(self, loss: torch.Tensor, epoch: int) -> None:
        """Remember, on the device and without waiting for it, whether this micro-batch's loss is
        non-finite, and the (step, epoch, loss) of the first one."""
        bad = (~torch.isfinite(loss.detach().float())).any()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=loss.device)
        here = torch.stack([
            torch.full_like(self._first_bad[0], self.state.step), torch.full_like(self._first_bad[0], epoch),
            loss.detach().to(torch.float64),
        ])
        self._first_bad = torch.where(bad & (self._first_bad[0] < 0), here, self._first_bad)

    def _check_nonfinite(self, loss: torch.Tensor | None = None) -> float:
        """Read the flag (one host sync, all ranks together): a non-finite loss since the last read
        ends the stage before anything is saved. Returns this micro-batch's loss for the progress bar."""
        if self._first_bad is None:
            return float("nan") if loss is None else loss.detach().float().item()
        vals = [self._first_bad[0] >= 0]
        if loss is not None:
            vals.append(loss.detach().to(self._first_bad.dtype))
        head = torch.stack([v.to(self._first_bad.dtype) for v in vals])
        bad = head[:1]
        if self.accelerator.num_processes > 1:  # every rank must stop together
            bad = self.accelerator.reduce(bad, "sum")
        read = torch.cat([bad, head[1:], self._first_bad]).tolist()
        if read[0] > 0:
            step, epoch, value = read[-3:]
            if step < 0:
                raise NonFiniteLoss(f"{self.name}: the loss is non-finite on another process (optimizer step <= "
                                    f"{self.state.step}){'; ' + self.nonfinite_hint if self.nonfinite_hint else ''}")
            self._raise_nonfinite(value, int(epoch), int(step))
        return read[1] if loss is not None else float("nan")

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.accelerator.num_processes > 1:  # every rank must take the same branch
            bad = self.accelerator.reduce(bad, "sum")
        return bool(bad.item() == 0)

    def _nonfinite(self, loss: torch.Tensor, epoch: int) -> None:
        if not self.skip_nonfinite:
            self._raise_nonfinite(loss.detach().float().item(), epoch, self.state.step)
        logger.warning(self._nonfinite_msg(loss.detach().float().item(), epoch, self.state.step) + "; step skipped")

    def _nonfinite_msg(self, value: float, epoch: int, step: int) -> str:
        return (f"{self.name}: loss is {value} at epoch {epoch + 1}, optimizer step {step}"
                f"{'; ' + self.nonfinite_hint if self.nonfinite_hint else ''}")

    def _raise_nonfinite(self, value: float, epoch: int, step: int) -> None:
        kept = latest_checkpoint(self.stage_dir)
        raise NonFiniteLoss(self._nonfinite_msg(value, epoch, step)
                            + (f" (the last good checkpoint, {kept.name}, is kept)" if kept else ""))

    # ---- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """The resumable state of every rank into a temporary folder, renamed into place once
        complete; the previous checkpoint is removed afterwards."""
        acc = self.accelerator
        folder = self.stage_dir / CHECKPOINTS
        final = folder / f"epoch_{self.state.epoch}"
        tmp = folder / f".tmp_epoch_{self.state.epoch}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            atomic_write_json(folder / SETTINGS_FILE, {"settings": self.settings, "stage": self.name})
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_weights(acc.unwrap_model(self.model).state_dict(), tmp / "model.safetensors")
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt"
            )
            for name, obj in self._tracked.items():
                _save_state_file(tmp, name, obj.state_dict())
            atomic_write_json(tmp / "train_state.json", self.state.state_dict())
        torch.save(_rng_state(self._generators), tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in folder.iterdir():
                if old.is_dir() and old.name.startswith("epoch_") and old != final:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load(self, folder: Path) -> None:
        acc = self.accelerator
        acc.unwrap_model(self.model).load_state_dict(_load_state_file(folder, "model"))
        opt = _load_state_file(folder, "optimizer")
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        for name, obj in self._tracked.items():
            obj.load_state_dict(_load_state_file(folder, name))
        try:
            self.state.load_state_dict(json.loads((folder / "train_state.json").read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"'{folder / 'train_state.json'}' is unreadable ({e}); delete '{folder}' to start over") from e
        rng = folder / f"rng_{acc.process_index}.pt"
        if rng.is_file():
            _set_rng_state(_load_state_file(folder, f"rng_{acc.process_index}"), self._generators)
        else:
            logger.warning("%s: %s has no random state for rank %d; it draws fresh numbers", self.name, folder, acc.process_index)

    # ---- the end -----------------------------------------------------------------------------

    def finish(self, metrics: dict, write: Callable[[], None] | None = None, title: str = "") -> None:
        """Write the stage's files on the main process: its own outputs (``write``), the history and
        curves, the settings it ran with (``config.yaml``) and last ``metrics.json``, the marker that
        the stage is complete. Then drop the resumable state and close the trackers."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            if write is not None:
                write()
            atomic_write_json(self.stage_dir / HISTORY, self.state.history)
            plot_curves(self.state.history, self.stage_dir / CURVES, title or self.name)
            save_config(self.cfg, self.stage_dir / CONFIG)
            atomic_write_json(self.stage_dir / METRICS, metrics)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(self.stage_dir / CHECKPOINTS, ignore_errors=True)
        acc.wait_for_everyone()
        if self.cfg.tensorboard and acc.log_with:
            finish_trackers(acc)


def _fmt(row: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)))


