"""The scaling rule: a recipe states its global batch and base learning rate once, the launch
decides how that batch is laid out.

A training section (``pretrain``, ``finetune``, ``semi``, ``diffusion``) with ``global_batch > 0``
gets its per-process ``batch_size`` and its ``grad_accum`` from the number of processes and the
per-device cap ``max_device_batch``:

    global_batch = batch_size x processes x grad_accum

With ``blr > 0`` its ``lr`` is ``blr x global_batch / 256`` (MAE, Semi-ViT and DiT all state their
learning rates this way). A global batch the launch cannot reach exactly is a ConfigError before
anything starts. With ``global_batch = 0`` and ``blr = 0`` (the small configs) nothing changes:
``batch_size`` is per process, as it always was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from semivit.errors import ConfigError

TRAINING_SECTIONS = ("pretrain", "finetune", "semi", "diffusion")
BLR_BATCH = 256  # the rule's reference batch


@dataclass(frozen=True)
class Layout:
    """How one section's global batch is laid out on a launch."""

    section: str
    processes: int
    per_process: int  # images per process per micro-batch (semi: labeled images)
    accum: int  # micro-batches per optimizer step
    lr: float
    derived: bool  # True: from global_batch (and blr); False: batch_size / grad_accum as given

    @property
    def global_batch(self) -> int:
        return self.per_process * self.processes * self.accum


def launch_processes() -> int:
    """The number of processes of this launch (``accelerate launch`` / ``torchrun`` set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def layout_section(sec, name: str, processes: int) -> Layout:
    """The layout of section ``name`` (its dataclass ``sec``) on ``processes`` processes."""
    if processes < 1:
        raise ConfigError(f"the number of processes must be >= 1 (got {processes})")
    gb, cap = int(sec.global_batch), int(sec.max_device_batch)
    if gb <= 0:
        per, accum = int(sec.batch_size), int(sec.grad_accum)
        lr = sec.blr * per * processes * accum / BLR_BATCH if sec.blr > 0 else sec.lr
        return Layout(name, processes, per, accum, lr, derived=False)
    if gb % processes:
        near = sorted({n for n in range(1, 4 * processes + 1) if gb % n == 0}, key=lambda n: abs(n - processes))[:3]
        raise ConfigError(
            f"setting '{name}.global_batch'={gb} cannot be split over {processes} processes (not divisible); "
            f"launch {' or '.join(map(str, sorted(near)))} processes, or set {name}.global_batch to a multiple of "
            f"{processes} (this changes the recipe: scale {name}.blr with it)"
        )
    per_proc = gb // processes
    accum = 1
    if cap > 0:
        # the fewest micro-batches whose equal share fits the cap
        accum = next(a for a in range(1, per_proc + 1) if per_proc % a == 0 and per_proc // a <= cap)
    lr = sec.blr * gb / BLR_BATCH if sec.blr > 0 else sec.lr
    return Layout(name, processes, per_proc // accum, accum, lr, derived=True)


def apply_scaling(cfg, processes: int | None = None, strict: bool = True) -> dict[str, Layout]:
    """Write each training section's derived ``batch_size``, ``grad_accum`` and ``lr`` into ``cfg``
    (in place) for a launch of ``processes`` (default: this launch's). Idempotent. ``strict=False``
    leaves a section whose global batch this launch cannot reach as it is (a stage that trains it
    refuses to start: ``check_launch``), so a config whose other stages fit still loads."""
    processes = launch_processes() if processes is None else processes
    out = {}
    for name in TRAINING_SECTIONS:
        sec = getattr(cfg, name)
        try:
            lay = layout_section(sec, name, processes)
        except ConfigError:
            if strict:
                raise
            continue
        if lay.derived:
            sec.batch_size, sec.grad_accum = lay.per_process, lay.accum
        sec.lr = lay.lr
        out[name] = lay
    return out


def check_launch(cfg, sections, processes: int | None = None) -> None:
    """A ConfigError, before a stage starts, when this launch cannot reach the global batch of one
    of the training ``sections`` it is about to train."""
    processes = launch_processes() if processes is None else processes
    for name in sections:
        if name in TRAINING_SECTIONS:
            layout_section(getattr(cfg, name), name, processes)
