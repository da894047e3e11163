"""MNIST-5k as your own data vs the benchmark mode of the same seed.

Writes MNIST-5k into the user layout: ``labeled/<digit>/`` = the benchmark run's labeled images
(``data.labels_per_class`` per class, drawn with the seed), ``unlabeled/`` = the other training
images under random names in nested folders (their labels are gone), ``val/<digit>/`` = the 1000
test images, all as grayscale PNG. Then runs ``dpt run`` on both (``--until`` a stage) with the
same config and seed, and records the top-1 and pseudo-label numbers of each.

The two runs cannot see the images in the same order (the user layout lists the labeled images
first, the benchmark source keeps MNIST's order), so the numbers agree within the spread of seeds,
not exactly; ``--spread-seeds`` runs the benchmark mode with other seeds to measure that spread.
The user layout normalises with data.name=imagefolder's statistics, the benchmark with MNIST's.

  nice python -m benchmarks.own_data_mnist --until semi --spread-seeds 1 \\
      pretrain.epochs=5 finetune.epochs=60 semi.epochs=4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.record import ROOT, result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.files import read_json

STAGES = {"finetune": "stage1/finetune", "semi": "stage1/semi", "retrain": "stage3"}


def write_layout(cfg, root: Path) -> dict:
    """MNIST-5k in labeled/ + unlabeled/ + val/; returns the counts written."""
    from PIL import Image

    from semivit.data.sources import build_data
    from semivit.data.split import draw_labeled

    bundle = build_data(cfg.data)
    labeled = set(draw_labeled(cfg.data, bundle.train, cfg.seed).tolist())
    rng = np.random.default_rng(12345)
    done = root / ".complete"
    if done.is_file():
        return read_json(done)
    for i in range(len(bundle.train)):
        img = bundle.train.load(i)
        if i in labeled:
            path = root / "labeled" / bundle.classes[bundle.train.targets[i]] / f"{i:05d}.png"
        else:  # a name and a folder that carry nothing
            path = root / "unlabeled" / f"{rng.integers(16):x}" / f"{rng.integers(1 << 48):012x}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img)).save(path)
    for i in range(len(bundle.test)):
        path = root / "val" / bundle.classes[bundle.test.targets[i]] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(bundle.test.load(i))).save(path)
    counts = {"labeled": len(labeled), "unlabeled": len(bundle.train) - len(labeled), "val": len(bundle.test)}
    import json

    done.write_text(json.dumps(counts))
    return counts


def run(out: Path, config: str, overrides: list[str], until: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dpt", "run", "--config", config, "--until", until, f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    row: dict = {}
    for name, rel in STAGES.items():
        m = out / rel / "metrics.json"
        if m.is_file():
            metrics = read_json(m)
            row[f"{name}_top1_ema"] = metrics.get("top1_ema")
            if name == "semi":
                row["semi_mask_ratio"] = metrics.get("mask_ratio")
                row["semi_pseudo_label_acc"] = metrics.get("pseudo_label_acc")
    pl = out / "stage1" / "pseudo_labels.json"
    if pl.is_file():
        row["pseudo_label_acc"] = read_json(pl).get("accuracy")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist5k.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-seeds", type=int, default=0, help="benchmark-mode runs with seeds seed+1.. for the spread")
    p.add_argument("--until", default="semi", help="last pipeline stage of each run")
    p.add_argument("--out", default=str(run_dir("benchmarks.own_data_mnist")))
    p.add_argument("--result", default=str(result_dir("benchmarks.own_data_mnist") / "own_data_mnist.json"))
    p.add_argument("overrides", nargs="*", help="settings for both runs, e.g. finetune.epochs=60")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = load_config(args.config, [f"seed={args.seed}", *args.overrides])
    counts = write_layout(cfg, out / "data")
    common = [f"seed={args.seed}", *args.overrides]
    rows = {
        "benchmark": run(out / f"benchmark_seed{args.seed}", args.config, common, args.until),
        "own_data": run(
            out / f"own_seed{args.seed}", args.config,
            [*common, "data.name=imagefolder", f"data.root={out / 'data'}", "data.channels=1"], args.until,
        ),
    }
    for s in range(args.seed + 1, args.seed + 1 + args.spread_seeds):
        rows[f"benchmark_seed{s}"] = run(out / f"benchmark_seed{s}", args.config, [f"seed={s}", *args.overrides], args.until)
    result = {"layout": counts, "until": args.until, "seed": args.seed, "overrides": args.overrides, "runs": rows}
    write_result(args.result, result)
    for name, row in rows.items():
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
