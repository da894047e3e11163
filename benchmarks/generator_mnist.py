"""Generator variants at equal stage-2 cost, judged by what stage 3 can use of them.

For a finished run (stage 1 done, its pseudo-labels and judge present), each variant trains the
stage-2 generator again with its own settings (same data, epochs and batch size: the same number of
optimizer steps) or only samples the run's generator differently, writes N images per class, and
is measured by:

    synthetic class accuracy  the judge (trained on all true labels) agrees with the class asked for
    FID                       on the judge's penultimate features, against the 1000 test images
    CAS (probe)               a logistic regression on the frozen MAE encoder trained on the
                              synthetic images alone, top-1 on the test images
    CAS (probe), real         the same regression on N real training images per class (true labels)

and its sample grid goes into one picture, variant by variant.

    python -m benchmarks.generator_mnist --run runs/mnist5k_seed0 \\
        --variant baseline: --variant vpred:diffusion.prediction_type=v_prediction \\
        --variant ddim50:generate.sampler=ddim,generate.steps=50

The variants' runs go to runs/bench/generator_mnist/<run name>/<variant>/ (--out), the table and
the grids to benchmarks/results/generator_mnist/<run name>.json and .png (--results), the JSON
with its provenance (command, commit, machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from benchmarks.record import result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.files import atomic_write_json, pyplot, read_json
from semivit.runtime.layout import METRICS, RELATIVE, RunLayout

TRAIN_KEYS = ("diffusion.",)  # a variant that changes these trains its own generator


def variant_run(args, name: str, overrides: list[str]) -> Path:
    """The variant's run folder: the source run's stage 0/1 files linked in, its own stage 2."""
    source = Path(args.run)
    run = Path(args.out) / name
    trains = any(o.startswith(TRAIN_KEYS) for o in overrides)
    run.mkdir(parents=True, exist_ok=True)
    links = [RELATIVE.stage0, RELATIVE.stage1, Path("label_split.csv"), Path("label_split.json")]
    if not trains:
        links.append(RELATIVE.stage2)
    own = source / RELATIVE.synthetic / METRICS
    if not overrides and own.is_file() and read_json(own).get("num_per_class") == args.n:
        links.append(RELATIVE.synthetic)  # the run's own generator and images, as many as asked for
    for rel in links:
        src, dst = source / rel, run / rel
        if dst.exists() or not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=os.link)
        else:
            os.link(src, dst)
    return run


def measure(args, name: str, overrides: list[str]) -> dict:
    from dpt.fid import run_fid, synthetic_class_accuracy
    from dpt.generate import run_generate
    from dpt.retrain import run_retrain
    from dpt.train_diffusion import run_train_diffusion

    run = variant_run(args, name, overrides)
    result_file = run / "generator_bench.json"
    if result_file.is_file():
        return read_json(result_file)
    base = [f"output_dir={run}", f"seed={args.seed}", f"generate.num_per_class={args.n}", *args.overrides]
    cfg = load_config(args.config, [*base, *overrides])
    lay = RunLayout(run)
    if not (lay.stage2 / METRICS).is_file():
        run_train_diffusion(cfg)
    if not (lay.synthetic / METRICS).is_file():
        run_generate(cfg)
    row: dict = {"variant": name, "overrides": overrides}
    row["synthetic_class_acc"] = synthetic_class_accuracy(args.judge, lay.synthetic)["synthetic_class_acc"]
    fid_cfg = load_config(args.config, [*base, *overrides, "fid.features=classifier", f"fid.classifier={args.judge}",
                                        f"fid.out={run / 'fid_judge.json'}"])
    row["fid"] = run_fid(fid_cfg)["fid"]
    probe = ["retrain.mode=probe", "retrain.synthetic_only=true", "retrain.init=stage0", f"retrain.synthetic_per_class={args.n}"]
    for source in ("synthetic", "real"):
        out = run / f"cas_probe_{source}"
        if not (out / METRICS).is_file():
            run_retrain(load_config(args.config, [*base, *overrides, *probe, f"retrain.source={source}"]), out_dir=out)
        row[f"cas_probe_{source}"] = read_json(out / METRICS)["top1"]
    stage2 = read_json(lay.stage2 / METRICS)
    row["stage2_seconds"] = stage2.get("seconds")
    row["stage2_steps"] = stage2.get("steps")
    atomic_write_json(result_file, row)
    return row


def grids(rows: list[dict], out: Path, path: Path) -> None:
    plt = pyplot()
    from PIL import Image

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        ax.imshow(Image.open(out / r["variant"] / "synthetic" / "grid.png"), cmap="gray")
        ax.set_title(f"{r['variant']}\nCAS {r['cas_probe_synthetic']:.1f}  acc {r['synthetic_class_acc']:.1f}  FID {r['fid']:.2f}",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist5k.yaml")
    p.add_argument("--run", required=True, help="a finished run folder (stage 0/1 and pseudo-labels)")
    p.add_argument("--judge", default="", help="classifier on all true labels (default: RUN/judge)")
    p.add_argument("--out", default="", help="variants go to OUT/NAME (default: runs/bench/generator_mnist/<run name>)")
    p.add_argument("--results", default="", help="folder of the table and grids (default: benchmarks/results/generator_mnist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--variant", action="append", required=True, help="NAME:key=value,key=value (empty: the run's own)")
    p.add_argument("overrides", nargs="*", help="key=value for every variant (the run's own settings)")
    args = p.parse_args(argv)
    args.judge = args.judge or str(Path(args.run) / "judge")
    args.out = args.out or str(run_dir(__name__) / Path(args.run).resolve().name)
    results = Path(args.results) if args.results else result_dir(__name__)
    rows = []
    for spec in args.variant:
        name, _, over = spec.partition(":")
        rows.append(measure(args, name, [o for o in over.split(",") if o]))
    print(f"{'variant':<12} {'class acc':>9} {'FID':>6} {'CAS syn':>8} {'CAS real':>9} {'stage-2 s':>9}")
    for r in rows:
        print(f"{r['variant']:<12} {r['synthetic_class_acc']:9.2f} {r['fid']:6.2f} {r['cas_probe_synthetic']:8.2f} "
              f"{r['cas_probe_real']:9.2f} {r['stage2_seconds'] or 0:9.0f}")
    name = Path(args.run).resolve().name
    png = results / f"{name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    grids(rows, Path(args.out), png)
    table = write_result(results / f"{name}.json", rows, argv=None if argv is None else [__file__, *argv])
    print(f"grids: {png}\nresults: {table}")


if __name__ == "__main__":
    main()
