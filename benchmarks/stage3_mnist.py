"""Stage 3 / whole-pipeline benchmark on MNIST-5k (10 labels per class by default).

For each seed: the whole pipeline (python -m dpt run), then stage 3 again with K synthetic images
per class for each K in --ks (K=0: the same semi-supervised retraining without synthetic images, so
extra training alone is not mistaken for the effect of the synthetic data), and optionally other
guidance scales at the default K. Prints a table of top-1 (final EMA model, 1000 test images) with
mean and spread over seeds, and writes it as JSON.

    python -m benchmarks.stage3_mnist --seeds 0 1 2 --ks 0 50 100 200 [--guidance 1 4]

Runs go to OUT/NAME_seedS (OUT: runs/bench/stage3_mnist/ unless --out), the table and plot to
RESULTS/NAME_stage3_bench.json and .png (RESULTS: benchmarks/results/stage3_mnist/ unless
--results), the JSON with its provenance (command, commit, machine); rows accumulate per seed.

Fewer labels: `data.labels_per_class=2 --name mnist5k_l2 --reuse mnist5k` (overrides first) takes stage 0 (MAE) and
the judge, which do not depend on the labeled split, from OUT/mnist5k_seedS (hard links).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.record import read_result, result_dir, run_dir, write_result
from dpt.generate import run_generate
from dpt.pipeline import run_pipeline
from dpt.retrain import run_retrain
from semivit.config.load import load_config
from semivit.files import pyplot, read_json
from semivit.runtime.layout import METRICS, RELATIVE, RunLayout
from semivit.stages.semi import run_semi


def top1(folder: Path) -> float:
    m = read_json(folder / METRICS)
    return m.get("top1_ema", m.get("top1"))


def bench_seed(args, seed: int) -> dict:
    run = Path(args.out) / f"{args.name}_seed{seed}"
    cfg = load_config(args.config, [f"output_dir={run}", f"seed={seed}", *args.overrides])
    if args.reuse:
        source = Path(args.out) / f"{args.reuse}_seed{seed}"
        if not RunLayout(source).encoder.is_file():
            sys.exit(f"--reuse {args.reuse}: '{RunLayout(source).encoder}' not found; run that pipeline "
                     f"for seed {seed} first, or leave out --reuse")
        for folder in (RELATIVE.stage0, RELATIVE.judge):
            if (source / folder).is_dir() and not (run / folder).exists():
                shutil.copytree(source / folder, run / folder, copy_function=os.link)
    t0 = time.time()
    summary = run_pipeline(cfg)
    row = {
        "seed": seed,
        "pipeline_seconds": round(time.time() - t0, 1),
        "supervised": summary.get("supervised_top1"),
        "semivit": summary.get("semivit_top1"),
        "ceiling": summary.get("ceiling_top1"),
        "fid": summary.get("fid"),
        "synthetic_class_acc": summary.get("synthetic_class_acc"),
        f"dpt_k{cfg.generate.num_per_class}_w{cfg.generate.guidance_scale:g}": summary.get("dpt_top1"),
    }
    bench = run / "bench"
    for w in [cfg.generate.guidance_scale, *args.guidance]:
        need = max(args.ks)
        gcfg = copy.deepcopy(cfg)
        gcfg.generate.num_per_class = need
        gcfg.generate.guidance_scale = w
        gcfg.generate.out = str(bench / f"synthetic_w{w:g}")
        own = RunLayout(run).synthetic
        if w == cfg.generate.guidance_scale and own.is_dir() and not Path(gcfg.generate.out).exists():
            # same model, seeds and settings: the run's own images are the first ones of this set
            shutil.copytree(own, gcfg.generate.out, copy_function=os.link)
        if need > 0:
            run_generate(gcfg)  # resumable: images already written are kept
        ks = args.ks if w == cfg.generate.guidance_scale else [cfg.generate.num_per_class]
        for k in ks:
            key = f"dpt_k{k}_w{w:g}"
            if key in row:  # the pipeline's own stage 3 (its K and guidance, a draw from the same generator)
                continue
            out = bench / key
            if (out / METRICS).is_file():
                row[key] = top1(out)
                continue
            rcfg = copy.deepcopy(gcfg)
            if k == 0:
                run_semi(rcfg, out_dir=out, init=str(RunLayout(run).semi))
            else:
                rcfg.retrain.synthetic = gcfg.generate.out
                rcfg.retrain.synthetic_per_class = k
                run_retrain(rcfg, out_dir=out)
            row[key] = top1(out)
    return row


def plot_k_sweep(rows: list[dict], ks: list[int], guidance: float, path: Path) -> None:
    """Top-1 against K (synthetic images per class): each seed, and the mean with its spread."""
    plt = pyplot()

    def value(r, k):
        v = r.get(f"dpt_k{k}_w{guidance:g}")
        return v if isinstance(v, (int, float)) else None

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        pts = [k for k in ks if value(r, k) is not None]
        if pts:
            ax.plot(pts, [value(r, k) for k in pts], "o-", alpha=0.35, label=f"seed {r['seed']}")
    means = [(k, [value(r, k) for r in rows if value(r, k) is not None]) for k in ks]
    means = [(k, v) for k, v in means if v]
    if means:
        ax.errorbar(
            [k for k, _ in means], [statistics.mean(v) for _, v in means],
            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in means], fmt="s-", color="k", capsize=3, label="mean ± sd",
        )
    semivit = [r["semivit"] for r in rows if isinstance(r.get("semivit"), (int, float))]
    if semivit:
        ax.axhline(statistics.mean(semivit), ls="--", color="gray", label="Semi-ViT (stage 1)")
    ax.set_xlabel("synthetic images per class (K)")
    ax.set_ylabel("top-1 % (EMA), 1000 test images")
    ax.set_title(f"stage 3 on real + K synthetic, guidance {guidance:g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist5k.yaml")
    p.add_argument("--out", default=str(run_dir(__name__)),
                   help="runs go to OUT/NAME_seedS (an existing run is reused; default: runs/bench/stage3_mnist)")
    p.add_argument("--results", default=str(result_dir(__name__)),
                   help="folder of NAME_stage3_bench.json and .png (default: benchmarks/results/stage3_mnist)")
    p.add_argument("--name", default="mnist5k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 50, 100, 200])
    p.add_argument("--reuse", default="", help="take stage 0 and the judge from OUT/REUSE_seedS (same seed)")
    p.add_argument("--guidance", type=float, nargs="*", default=[], help="extra guidance scales at the default K")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    # results accumulate per seed across invocations (a guidance sweep adds keys to a K sweep's rows)
    out_json = Path(args.results) / f"{args.name}_stage3_bench.json"
    merged = {r["seed"]: r for r in (read_result(out_json) if out_json.is_file() else [])}
    for s in args.seeds:
        merged[s] = {**merged.get(s, {}), **bench_seed(args, s)}
        # a seed at a time
        write_result(out_json, [merged[k] for k in sorted(merged)], argv=None if argv is None else [__file__, *argv])
    rows = [merged[k] for k in sorted(merged)]
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "seed"))
    print(f"\n{'metric':<24} " + " ".join(f"seed{r['seed']:>3}" for r in rows) + "   mean ± sd")
    for k in keys:
        vals = [r.get(k) for r in rows]
        nums = [v for v in vals if isinstance(v, (int, float))]
        cells = " ".join(f"{v:7.2f}" if isinstance(v, (int, float)) else "      -" for v in vals)
        spread = f"{statistics.mean(nums):7.2f} ± {statistics.stdev(nums):.2f}" if len(nums) > 1 else ""
        print(f"{k:<24} {cells}   {spread}")
    guidance = load_config(args.config, list(args.overrides)).generate.guidance_scale
    png = Path(args.results) / f"{args.name}_stage3_bench.png"
    ks = sorted({int(k.split("_")[1][1:]) for r in rows for k in r if k.startswith("dpt_k") and k.endswith(f"_w{guidance:g}")})
    plot_k_sweep(rows, ks, guidance, png)
    print(f"plot: {png}\nresults: {out_json}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
