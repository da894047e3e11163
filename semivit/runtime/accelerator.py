"""What every training stage shares: the Accelerator, the lr schedule, resumable state,
atomic checkpoints, the stage folder and the curves plot."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from semivit.config.schema import Config
from semivit.errors import ConfigError
from semivit.files import atomic_path, atomic_write_json, pyplot
from semivit.runtime.layout import CHECKPOINTS, LOGS, METRICS

logger = logging.getLogger("semivit")


def setup_logging(accelerator: Accelerator | None = None) -> None:
    level = logging.INFO if accelerator is None or accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for name in ("semivit", "dpt"):
        logging.getLogger(name).setLevel(level)
    # accelerate logs every file of every save_state at INFO
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def use_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def distributed_state() -> PartialState:
    """The process group, formed the same way the stages' Accelerators form it: it is a singleton,
    so whichever is created first decides, and a CPU launch must still make gloo ranks."""
    return PartialState(cpu=use_cpu())


def leave_process_group(ok: bool = True) -> None:
    """Tear the process group down before the interpreter exits. A rank that exits with gloo work
    objects still alive can abort (SIGABRT) in interpreter finalization while its peer is closing
    the same sockets, so every command ends here: after a clean run the ranks meet once more and
    leave together; after an error the group is only closed, since the other ranks may never come."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    state = distributed_state()
    if ok:
        state.wait_for_everyone()
    state.destroy_process_group()


def make_accelerator(cfg: Config, stage_dir: Path, amp: str = "no", grad_accum: int = 1) -> Accelerator:
    """One Accelerator per stage. Without CUDA it runs on the CPU, and a multi-process launch still
    forms real (gloo) ranks, so the distributed path is the same one that runs on GPUs.

    Accelerate keeps the precision and accumulation settings in process-wide singletons; each stage
    of a pipeline run chooses its own, so they are reset here (the process group is kept)."""
    cpu = use_cpu()
    if amp == "fp16" and cpu:
        raise ConfigError(
            "amp=fp16 needs a GPU (fp16 autocast is not supported on the CPU); use amp=bf16 or amp=no for this stage"
        )
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    log_with = None
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            pass
    if not cpu:
        enable_tf32(cfg.train.tf32)
    accelerator = Accelerator(
        mixed_precision=amp,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(stage_dir), logging_dir=str(stage_dir / LOGS)),
        cpu=cpu,
        # batches move to the GPU with non_blocking copies (from the loaders' pinned memory)
        dataloader_config=DataLoaderConfiguration(non_blocking=bool(cfg.train.pin_memory) and not cpu),
    )
    setup_logging(accelerator)
    # every rank seeds the same here, so model initialisation agrees; training then switches each
    # rank to its own stream (semivit.runtime.loop.seed_rank_stream)
    set_seed(cfg.seed)
    return accelerator


def enable_tf32(on: bool = True) -> None:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (Ampere and newer): the float32
    parts of a bf16 run (and fp32 runs) at several times the speed, with bf16-like mantissa error."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the TensorBoard writers. Not ``end_training``: that also destroys the process group,
    and the pipeline runs further stages on the same ranks after this one."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up then cosine decay to ``min_lr_ratio`` of each group's lr, per iteration."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainState:
    """Epoch/step counters and the metric history; saved with ``save_state`` so a resumed run
    continues where it stopped and its curves stay whole."""

    def __init__(self):
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = list(state["history"])


def latest_checkpoint(stage_dir: Path) -> Path | None:
    folder = stage_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch_") and p.name[6:].isdigit()]
    return max(done, key=lambda p: int(p.name[6:]), default=None)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """One panel per logged quantity over epochs, written atomically as a PNG."""
    if not history:
        return
    plt = pyplot()

    keys = [k for k in history[-1] if k != "epoch" and isinstance(history[-1][k], (int, float))]
    keys = [k for k in keys if not k.startswith("hist") and k != "step"][:12]
    if not keys:
        return
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(h["epoch"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_metrics(stage_dir: Path, metrics: dict) -> None:
    atomic_write_json(stage_dir / METRICS, metrics)
