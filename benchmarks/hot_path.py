"""The training loop's hot path, one change at a time, through the project's own Trainer.

Each variant trains the same ViT classifier on random images already in memory for a fixed number
of optimizer steps (after untimed warm-up steps) and reports images/s:

  sync_every_step   the non-finite flag read after every optimizer step (train.nonfinite_every=1:
                    the host waits for the device once per step, as the loop used to)
  flag_every_50     the flag stays on the device and is read every 50 steps (the default)
  adamw_for_loop    AdamW with a Python loop over the parameters (foreach=False)
  adamw_foreach     AdamW with multi-tensor (foreach) kernels: torch's default on CUDA
  adamw_fused       fused AdamW (one kernel per group), built after the model is on the device
  compile           train.compile=true (torch.compile in place; the compile time is in the warm-up)
  tf32              CUDA only: train.tf32=true against false, float32 model (the bf16 runs' fp32 parts)
  pinned            CUDA only: pinned loader memory + non_blocking copies against pageable memory

On the CPU the device runs in step with the host, so a host read waits for nothing and the flag
variants should match; TF32 and pinned memory do not exist there. The GPU command:

    python -m benchmarks.hot_path --model vit_base_patch16_224 --image-size 224 --batch-size 128 --steps 30

The small CPU run committed in benchmarks/results/hot_path/:

    OMP_NUM_THREADS=1 python -m benchmarks.hot_path --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from benchmarks.record import result_dir, write_result
from semivit.config.load import load_config
from semivit.models.classifier import create_classifier
from semivit.runtime.loop import Trainer

VARIANTS = ("sync_every_step", "flag_every_50", "adamw_for_loop", "adamw_foreach", "adamw_fused", "compile",
            "tf32_off", "tf32", "pageable", "pinned")
CUDA_ONLY = {"tf32_off", "tf32", "pageable", "pinned"}


def run_variant(name: str, args, workdir: Path) -> dict:
    cuda = torch.cuda.is_available()
    overrides = [
        f"output_dir={workdir}", "tensorboard=false", f"model.name={args.model}", f"data.image_size={args.image_size}",
        "data.channels=3",
        f"train.nonfinite_every={1 if name == 'sync_every_step' else 50}",
        f"train.compile={'true' if name == 'compile' else 'false'}",
        f"train.tf32={'false' if name == 'tf32_off' else 'true'}",
        f"train.pin_memory={'false' if name == 'pageable' else 'true'}",
        f"data.num_workers={args.workers if name in ('pageable', 'pinned') else 0}",
    ]
    cfg = load_config(None, overrides)
    amp = "bf16" if cuda and name not in ("tf32", "tf32_off") else "no"  # tf32: the float32 model
    trainer = Trainer(cfg, name, workdir / name, sections=("finetune",), amp=amp)
    n = args.batch_size * (args.warmup + args.steps)
    # pinned memory matters where batches come from a loader; elsewhere the images start on the device
    on_device = name not in ("pageable", "pinned")
    images = torch.randn(n, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (n,))
    if on_device:
        images, labels = images.to(trainer.device), labels.to(trainer.device)
    loader = trainer.loader(TensorDataset(images, labels), args.batch_size, shuffle=False)
    torch.manual_seed(0)
    model = create_classifier(cfg.model, 10, args.image_size, 3).to(trainer.device)
    kind = {"adamw_for_loop": {"foreach": False}, "adamw_foreach": {"foreach": True}}.get(name, {"fused": True})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kind)
    model, loader = trainer.prepare(model, opt, loader)
    trainer.schedule(epochs=1, warmup_steps=0)
    marks: dict[int, float] = {}

    def on_update(step: int) -> None:
        if step + 1 in (args.warmup, args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            marks[step + 1] = time.perf_counter()

    def step(batch):
        x, y = batch
        with trainer.accelerator.autocast():
            return {"loss": torch.nn.functional.cross_entropy(model(x), y)}

    trainer.fit(1, lambda epoch: loader, step, on_update=on_update, checkpoint_every=0)
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    return {"variant": name, "images_per_s": args.steps * args.batch_size / seconds,
            "step_ms": 1e3 * seconds / args.steps, "optimizer": next(iter(kind)) + "=True" if kind else "default"}


def hot_path_args(small: bool) -> argparse.Namespace:
    """The settings of a run: a small CPU-sized one, or the GPU command's."""
    argv = (["--model", "vit_micro_patch4", "--image-size", "16", "--batch-size", "8", "--steps", "3", "--warmup", "1"]
            if small else ["--model", "vit_base_patch16_224", "--image-size", "224", "--batch-size", "128", "--steps", "30"])
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_compact_patch4")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--workers", type=int, default=4, help="loader workers of the pinned / pageable variants")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (1 on a shared CPU)")
    p.add_argument("--out", default="", help="JSON file (default: benchmarks/results/hot_path/<device>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    rows, skipped = [], []
    for name in args.variants.split(","):
        if name in CUDA_ONLY and not cuda:
            skipped.append(name)
            continue
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            row = run_variant(name, args, Path(tmp))
        rows.append(row)
        print(f"{name:16} {row['images_per_s']:10.1f} images/s  {row['step_ms']:8.1f} ms/step", flush=True)
    by = {r["variant"]: r["images_per_s"] for r in rows}
    ratios = {f"{b}/{a}": by[b] / by[a] for a, b in (("sync_every_step", "flag_every_50"), ("adamw_for_loop", "adamw_foreach"),
              ("adamw_foreach", "adamw_fused"), ("flag_every_50", "compile"), ("tf32_off", "tf32"), ("pageable", "pinned"))
              if a in by and b in by}
    data = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "device": "cuda" if cuda else "cpu",
            "load_average_1_5_15min": list(os.getloadavg()),  # a shared CPU: other work in the timings
            "rows": rows, "speedups": ratios, "not_run_here": skipped}
    out = Path(args.out) if args.out else result_dir("benchmarks.hot_path") / f"{'cuda' if cuda else 'cpu'}.json"
    write_result(out, data)
    for k, v in ratios.items():
        print(f"{k}: x{v:.3f}")
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
