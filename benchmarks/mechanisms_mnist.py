"""When does the generator pay? Stage 3 with each source of extra images, per mode, paired per seed.

For each labels-per-class count L and seed: stages 1-2 of the pipeline (`dpt run --until generate`,
stage 0 = one MAE encoder given by --encoder, shared by every run), then stage 3 in each --modes
with each source of extra labeled images, all from the same stage-1 model and labeled split:

    none         K = 0: the real labeled images only (the control for the retraining itself)
    pseudo-real  K real unlabeled images per class with their stage-1 pseudo-labels (self-training)
    synthetic    K generated images per class (DPT)
    synthetic-f  the same, keeping only images the stage-1 classifier gives their class >= --filter

Modes: probe (DPT's protocol: logistic regression on the frozen MAE encoder), supervised
(fine-tuning the MAE encoder on real + extra images, the fine-tuning recipe and steps of stage 1a)
and semi (Semi-ViT from the stage-1 model, 20 more epochs). The supervised K = 0 cell is stage 1a
itself (the same computation: same settings, seed and data order). With --mixup, Semi-ViT (stage
1b) is also run with probabilistic pseudo mixup from the same fine-tuned model. With --cas, a
classifier trained on the K synthetic images per class alone is set against the same classifier on
K real unlabeled images per class with their true labels (Classification Accuracy Score).

With --generators, the synthetic source is made by each named generator (GENERATORS below) from
the same stage-1 model and pseudo-labels: the first trains in the run folder, each other one in a
sibling folder OUT/l<L>_seed<S>_gen-<name> that shares the run's stage-1 files (hard links), and its
cells are named `<mode>/synthetic@<name>`. Each generator's judge class accuracy, texture measures
(dpt.quality) and stage-2/generation seconds go into the row.

Every top-1 is the final model (EMA where the stage keeps one) on the 1000 test images; nothing is
selected on them. Every run's row accumulates in OUT/l<L>_seed<S>/bench/row.json (a cell already
done is read back; OUT: runs/bench/mechanisms_mnist/), the table is printed, and the rows of every
run in OUT go to RESULTS/mechanisms.json with their provenance (command, commit, machine), and
RESULTS/mechanisms.png plots the gain over K = 0 per source, per mode (RESULTS:
benchmarks/results/mechanisms_mnist/).

    python -m benchmarks.mechanisms_mnist --labels 1 2 5 10 --seeds 0 1 2 --modes probe supervised \\
        --encoder runs/mnist5k_seed0/stage0/encoder.safetensors --judge runs/mnist5k_seed0/judge \\
        --mixup 2 10 --cas 2 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from benchmarks.record import result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.files import atomic_write_json, pyplot, read_json
from semivit.runtime.layout import METRICS, RELATIVE, RunLayout

SOURCES = ("none", "pseudo-real", "synthetic", "synthetic-f")

# Generators of the synthetic source, by name (--generators): the settings each one sets.
_DIT = ["diffusion.model=dit", "diffusion.patch_size=4", "diffusion.hidden_size=128", "diffusion.depth=4",
        "diffusion.num_heads=4", "diffusion.init=diffusers", "generate.guidance_scale=2.0"]
_UNET = ["diffusion.model=unet", "diffusion.unet_channels=[16,32,64]", "diffusion.unet_layers_per_block=1",
         "diffusion.unet_attention_levels=1", "generate.guidance_scale=1.5"]
GENERATORS = {
    "dit": _DIT,  # the pixel DiT of the MNIST-5k config before the UNet (16 epochs, ~2,000 steps), guidance 2
    "unet": _UNET,  # the small UNet of configs/mnist5k.yaml, guidance 1.5
    "unet-2x": [*_UNET, "diffusion.epochs=32"],  # one point further along the compute curve
}
MODE_INIT = {"probe": "stage0", "supervised": "stage0", "semi": "stage1"}


def top1(folder: Path) -> float:
    m = read_json(folder / METRICS)
    return m.get("top1_ema", m.get("top1"))


def base_config(args, labels: int, seed: int, run: Path, *extra: str):
    return load_config(
        args.config,
        [
            f"output_dir={run}", f"seed={seed}", f"data.labels_per_class={labels}",
            *([f"model.init={args.encoder}"] if args.encoder else []),
            "pipeline.judge=false", f"generate.num_per_class={args.pool}", *args.overrides, *extra,
        ],
    )


def _link(src: Path, dst: Path) -> None:
    """Hard links of a file or folder (mtimes included); nothing when ``dst`` exists or ``src`` does not."""
    if dst.exists() or not src.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=os.link)
    else:
        os.link(src, dst)


def link_run(source: Path, run: Path) -> None:
    """--from-run: a finished pipeline run's stages (0, 1, judge, 2) as the benchmark run's own. The
    pipeline skips every stage whose settings are the same; the state file is copied (it is rewritten)."""
    if not (source / "pipeline.json").is_file():
        raise SystemExit(f"--from-run {source}: no pipeline.json (a folder written by `python -m dpt run`)")
    run.mkdir(parents=True, exist_ok=True)
    lay = RELATIVE
    for rel, done in ((lay.stage0, METRICS), (lay.stage1, "pseudo_labels.json"), (lay.judge, METRICS),
                      (lay.stage2, METRICS), (lay.synthetic, METRICS), (lay.stage3, METRICS),
                      (Path("label_split.csv"), ""), (Path("label_split.json"), "")):
        if not done or (source / rel / done).is_file():  # a stage still running there is not linked
            _link(source / rel, run / rel)
    if not (run / "pipeline.json").exists():
        shutil.copy2(source / "pipeline.json", run / "pipeline.json")


def generator_run(args, labels: int, seed: int, run: Path, name: str):
    """The config and folder in which generator ``name`` trains and generates from the stage-1 files
    of ``run``: the run folder itself for the first of --generators, a sibling folder otherwise."""
    if name == args.generators[0]:
        return base_config(args, labels, seed, run, *GENERATORS[name]), run
    other = run.parent / f"{run.name}_gen-{name}"
    lay = RunLayout(run)
    other.mkdir(parents=True, exist_ok=True)
    if not (other / "pipeline.json").exists():
        shutil.copy2(run / "pipeline.json", other / "pipeline.json")
    for path in (run / "label_split.csv", run / "label_split.json", lay.stage0, lay.finetune, lay.semi,
                 lay.pseudo_labels_csv, lay.pseudo_labels_json):
        _link(path, other / path.relative_to(run))  # the same files, mtimes included
    return base_config(args, labels, seed, other, *GENERATORS[name]), other


def generator_facts(args, cfg, gen_run: Path) -> dict:
    """Judge class accuracy, texture measures and seconds of the synthetic set of one generator."""
    from dpt.quality import synthetic_vs_real
    from dpt.state import stage_seconds
    from semivit.data.sources import build_data

    seconds = stage_seconds(cfg)
    tex = synthetic_vs_real(RunLayout(gen_run).synthetic, build_data(cfg.data).test)
    return {
        "synthetic_class_acc": judge_class_acc(cfg, args.judge),
        "train_diffusion_seconds": seconds.get("train-diffusion"),
        "generate_seconds": seconds.get("generate"),
        "texture": tex["synthetic"],
        "texture_real": tex["real"],
    }


def cell_overrides(mode: str, source: str, args) -> list[str]:
    src = "synthetic" if source.startswith("synthetic") else source
    out = [f"retrain.mode={mode}", f"retrain.source={src}", f"retrain.init={MODE_INIT[mode]}"]
    if src == "pseudo-real" or (src == "synthetic" and args.k != args.pool):  # else every generated image
        out.append(f"retrain.synthetic_per_class={args.k}")
    if source == "synthetic-f":
        out.append(f"retrain.filter_conf={args.filter}")
    return out


def judge_class_acc(cfg, judge: str) -> float | None:
    """Share of the synthetic images the judge (a classifier trained on all true labels) assigns to
    the class they were generated for."""
    if not judge:
        return None
    from dpt.fid import synthetic_class_accuracy

    return synthetic_class_accuracy(judge, RunLayout(cfg.run_dir).synthetic)["synthetic_class_acc"]


def bench_run(args, labels: int, seed: int) -> dict:
    from dpt.pipeline import run_pipeline
    from dpt.retrain import run_retrain
    from semivit.stages.semi import run_semi

    run = Path(args.out) / f"l{labels}_seed{seed}"
    if args.from_run:
        link_run(Path(args.from_run.format(seed=seed)), run)
    gens = args.generators
    cfg = base_config(args, labels, seed, run, *(GENERATORS[gens[0]] if gens else []))
    run_pipeline(cfg, until="generate")
    lay = RunLayout(run)
    cached = read_json(run / "bench" / "row.json") if (run / "bench" / "row.json").is_file() else {}
    row: dict = {k: v for k, v in cached.items() if k != "cells"}  # what earlier invocations measured
    row.update(labels=labels, seed=seed, supervised=top1(lay.finetune), semivit=top1(lay.semi))
    row["pseudo_label_acc"] = read_json(lay.pseudo_labels_json).get("accuracy")
    if "synthetic_class_acc" not in cached and args.judge:
        cached["synthetic_class_acc"] = judge_class_acc(cfg, args.judge)
    row["synthetic_class_acc"] = cached.get("synthetic_class_acc")
    cells = dict(cached.get("cells", {}))
    if gens:
        return generator_cells(args, labels, seed, run, row, cells)
    for mode in [] if args.only_mixup else args.modes:
        for source in SOURCES:
            key = f"{mode}/{source}"
            if key in cells:
                continue
            if mode == "supervised" and source == "none":
                cells[key] = row["supervised"]  # stage 1a is this computation
                continue
            if mode == "semi" and labels not in args.semi_labels:
                continue
            if source == "synthetic-f" and mode not in args.filtered_modes:
                continue
            out = run / "bench" / key.replace("/", "_")
            if not (out / METRICS).is_file():
                run_retrain(base_config(args, labels, seed, run, *cell_overrides(mode, source, args)), out_dir=out)
            cells[key] = top1(out)
            m = read_json(out / METRICS)
            if source == "synthetic-f":
                row.setdefault("filter_kept", m.get("filter_kept"))
            if source == "pseudo-real":
                row.setdefault("pseudo_real_label_acc", m.get("extra_label_acc"))
            _save(run, row, cells)
    if labels in args.cas and not args.only_mixup:
        for mode in args.cas_modes:
            for source in ("synthetic", "real"):
                key = f"cas-{mode}/{source}"
                out = run / "bench" / key.replace("/", "_")
                if not (out / METRICS).is_file():
                    over = [f"retrain.mode={mode}", f"retrain.source={source}", "retrain.init=stage0",
                            f"retrain.synthetic_per_class={args.k}", "retrain.synthetic_only=true",
                            *([f"finetune.epochs={args.cas_epochs}"] if mode == "supervised" else [])]
                    run_retrain(base_config(args, labels, seed, run, *over), out_dir=out)
                cells[key] = top1(out)
                _save(run, row, cells)
    if labels in args.mixup:
        mixed = Path(args.out) / f"l{labels}_seed{seed}_mixup"
        semi_dir = RunLayout(mixed).semi
        if not (semi_dir / METRICS).is_file():
            mcfg = base_config(args, labels, seed, mixed, "semi.pseudo_mixup=true")
            mixed.mkdir(parents=True, exist_ok=True)
            for f in ("label_split.csv", "label_split.json"):  # the same labeled images
                if (run / f).is_file() and not (mixed / f).exists():
                    (mixed / f).write_bytes((run / f).read_bytes())
            run_semi(mcfg, init=str(lay.finetune))
        cells["semivit/mixup"] = top1(semi_dir)
        for tag, folder in (("off", lay.semi), ("on", semi_dir)):
            m = read_json(folder / METRICS)
            hist = read_json(folder / "history.json")
            row[f"mixup_{tag}"] = {
                "top1": top1(folder),
                "mask_ratio_first": hist[0].get("mask_ratio"),
                "mask_ratio_last": m.get("mask_ratio"),
                "pseudo_label_acc_last": m.get("pseudo_label_acc"),
            }
    row["cells"] = cells
    _save(run, row, cells)
    return row


def generator_cells(args, labels: int, seed: int, run: Path, row: dict, cells: dict) -> dict:
    """The cells of a --generators run: K = 0 and pseudo-real once, the synthetic source per generator.
    Order: each generator and its probe cells, then each generator's semi cell, then the (costly) semi
    controls, so an interrupted benchmark has the generators' cells first."""
    from dpt.pipeline import finished_with, run_pipeline
    from dpt.retrain import run_retrain

    facts = dict(row.get("generators", {}))
    runs = {}
    for name in args.generators:
        gcfg, runs[name] = generator_run(args, labels, seed, run, name)
        run_pipeline(gcfg, until="generate")
        if name not in facts:
            facts[name] = generator_facts(args, gcfg, runs[name])
            row["generators"] = facts
            _save(run, row, cells)
        if seed == min(args.seeds):  # one grid per generator and label count, for the eye
            grid = Path(args.results) / f"{args.name}_grid_{name}_l{labels}_seed{seed}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(RunLayout(runs[name]).synthetic / "grid.png", grid)
    first = args.generators[0]
    todo = [(first, m, src) for m in args.modes if m != "semi" for src in ("none", "pseudo-real")]
    todo += [(g, m, "synthetic") for g in args.generators for m in args.modes if m != "semi"]
    if "semi" in args.modes and labels in args.semi_labels:
        todo += [(g, "semi", "synthetic") for g in args.generators if "synthetic" in args.semi_sources]
        todo += [(first, "semi", src) for src in ("none", "pseudo-real") if src in args.semi_sources]
    for name, mode, source in todo:
        key = f"{mode}/{source}" + (f"@{name}" if source == "synthetic" else "")
        if key in cells:
            continue
        out = run / "bench" / key.replace("/", "_")
        if mode == "semi" and args.from_run and name == first:  # its stage 3 may have finished meanwhile
            link_run(Path(args.from_run.format(seed=seed)), run)
        ccfg = base_config(args, labels, seed, runs[name], *GENERATORS[name], *cell_overrides(mode, source, args))
        if not (out / METRICS).is_file() and finished_with(ccfg, "retrain"):
            out = RunLayout(runs[name]).stage3  # the run's own stage 3 is this computation
        if not (out / METRICS).is_file():
            run_retrain(ccfg, out_dir=out)
        cells[key] = top1(out)
        if source == "pseudo-real":
            row.setdefault("pseudo_real_label_acc", read_json(out / METRICS).get("extra_label_acc"))
        _save(run, row, cells)
    row["generators"] = facts
    row["cells"] = cells
    _save(run, row, cells)
    return row


def _save(run: Path, row: dict, cells: dict) -> None:
    atomic_write_json(run / "bench" / "row.json", {**row, "cells": cells})


def paired(rows: list[dict], labels: int, key: str, base: str) -> list[float]:
    """Per-seed differences cell[key] - cell[base] at one label count (seeds that have both)."""
    out = []
    for r in rows:
        c = r["cells"]
        if r["labels"] == labels and c.get(key) is not None and c.get(base) is not None:
            out.append(c[key] - c[base])
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f} (1 seed)"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def level(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}" + sd


def controls(rows: list[dict], modes: list[str]):
    """(mode, labels, K = 0 cell name, its top-1 per seed) for each mode and label count that has K = 0."""
    for mode in modes:
        for L in sorted({r["labels"] for r in rows}):
            base = f"{mode}/none"
            k0 = [r["cells"][base] for r in rows if r["labels"] == L and r["cells"].get(base) is not None]
            if k0:
                yield mode, L, base, k0


def table(rows: list[dict], modes: list[str]) -> str:
    label_counts = sorted({r["labels"] for r in rows})
    lines = ["| mode | labels/class | seeds | K = 0, top-1 % | pseudo-real − K=0 | synthetic − K=0 | synthetic-f − K=0 | synthetic − pseudo-real |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, L, base, k0 in controls(rows, modes):
        lines.append(
            f"| {mode} | {L} | {len(k0)} | {level(k0)} | {fmt(paired(rows, L, f'{mode}/pseudo-real', base))} | "
            f"{fmt(paired(rows, L, f'{mode}/synthetic', base))} | {fmt(paired(rows, L, f'{mode}/synthetic-f', base))} | "
            f"{fmt(paired(rows, L, f'{mode}/synthetic', f'{mode}/pseudo-real'))} |"
        )
    lines += ["", "| labels/class | seeds | supervised (1a) | Semi-ViT (1b) | pseudo-label acc | synthetic class acc (judge) |",
              "|---|---|---|---|---|---|"]
    for L in label_counts:
        sel = [r for r in rows if r["labels"] == L]
        cols = [level([r[k] for r in sel if r.get(k) is not None])
                for k in ("supervised", "semivit", "pseudo_label_acc", "synthetic_class_acc")]
        lines.append(f"| {L} | {len(sel)} | " + " | ".join(cols) + " |")
    cas = [r for r in rows if any(k.startswith("cas-") for k in r["cells"])]
    if cas:
        lines += ["", "| CAS: trained on K images per class alone | labels/class | seeds | synthetic | real (true labels) | synthetic − real |",
                  "|---|---|---|---|---|---|"]
        for mode in ("probe", "supervised"):
            for L in sorted({r["labels"] for r in cas}):
                s = [r["cells"][f"cas-{mode}/synthetic"] for r in cas if r["labels"] == L and f"cas-{mode}/synthetic" in r["cells"]]
                t = [r["cells"][f"cas-{mode}/real"] for r in cas if r["labels"] == L and f"cas-{mode}/real" in r["cells"]]
                if s:
                    lines.append(f"| {mode} | {L} | {len(s)} | {level(s)} | {level(t)} | {fmt(paired(cas, L, f'cas-{mode}/synthetic', f'cas-{mode}/real'))} |")
    mix = [r for r in rows if "mixup_on" in r]
    if mix:
        lines += ["", "| pseudo mixup | labels/class | seeds | off, top-1 % | on, top-1 % | on − off | mask ratio first → last epoch, off | on |",
                  "|---|---|---|---|---|---|---|---|"]
        for L in sorted({r["labels"] for r in mix}):
            sel = [r for r in mix if r["labels"] == L]
            off = [r["mixup_off"]["top1"] for r in sel]
            on = [r["mixup_on"]["top1"] for r in sel]
            mr = {t: " / ".join(f"{r[f'mixup_{t}']['mask_ratio_first']:.2f}→{r[f'mixup_{t}']['mask_ratio_last']:.2f}" for r in sel)
                  for t in ("off", "on")}
            diff = fmt([b - a for a, b in zip(off, on, strict=True)])
            lines.append(f"| | {L} | {len(sel)} | {level(off)} | {level(on)} | {diff} | {mr['off']} | {mr['on']} |")
    return "\n".join(lines)


def generator_table(rows: list[dict], modes: list[str], gens: list[str]) -> str:
    """Paired differences per generator (cells ``<mode>/synthetic@<name>``) and each generator's images."""
    label_counts = sorted({r["labels"] for r in rows})
    head = "| mode | labels/class | seeds | K = 0, top-1 % | pseudo-real − K=0 |"
    for g in gens:
        head += f" {g} − K=0 | {g} − pseudo-real |"
    lines = [head, "|" + "---|" * (5 + 2 * len(gens))]
    for mode, L, base, k0 in controls(rows, modes):
        line = f"| {mode} | {L} | {len(k0)} | {level(k0)} | {fmt(paired(rows, L, f'{mode}/pseudo-real', base))} |"
        for g in gens:
            key = f"{mode}/synthetic@{g}"
            line += f" {fmt(paired(rows, L, key, base))} | {fmt(paired(rows, L, key, f'{mode}/pseudo-real'))} |"
        lines.append(line)
    lines += ["", "| generator | labels/class | seeds | class acc (judge) % | isolated px % | pieces per digit | total variation | stage-2 + generation s |",
              "|---|---|---|---|---|---|---|---|"]
    for g in gens:
        for L in label_counts:
            facts = [r["generators"][g] for r in rows if r["labels"] == L and g in r.get("generators", {})]
            if not facts:
                continue
            secs = [(f["train_diffusion_seconds"] or 0) + (f["generate_seconds"] or 0) for f in facts]
            lines.append(
                f"| {g} | {L} | {len(facts)} | {level([f['synthetic_class_acc'] for f in facts if f['synthetic_class_acc'] is not None])} | "
                f"{level([100 * f['texture']['isolated_pixel_rate'] for f in facts], 3)} | "
                f"{level([f['texture']['fragments'] for f in facts])} | "
                f"{level([f['texture']['total_variation'] for f in facts], 3)} | {level(secs, 0)} |")
    real = next((r["generators"][g]["texture_real"] for r in rows for g in gens if g in r.get("generators", {})), None)
    if real:
        lines.append(f"| real test digits | | | | {100 * real['isolated_pixel_rate']:.3f} | {real['fragments']:.2f} | "
                     f"{real['total_variation']:.3f} | |")
    return "\n".join(lines)


def plot(rows: list[dict], modes: list[str], path: Path, gens: list[str] = ()) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    modes = [m for m in modes if any(r["cells"].get(f"{m}/none") is not None for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.4), squeeze=False, sharey=False)
    sources = ["pseudo-real", *(f"synthetic@{g}" for g in gens)] if gens else ["pseudo-real", "synthetic", "synthetic-f"]
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    colors = dict(zip(sources, palette, strict=False))
    for ax, mode in zip(axes[0], modes, strict=True):
        label_counts = sorted({r["labels"] for r in rows})
        for k, source in enumerate(sources):
            pts = [(L, paired(rows, L, f"{mode}/{source}", f"{mode}/none")) for L in label_counts]
            pts = [(L, d) for L, d in pts if d]
            if not pts:
                continue
            xs = [L * (1 + 0.04 * (k - 1)) for L, _ in pts]  # a small offset so the error bars do not overlap
            ys = [statistics.mean(d) for _, d in pts]
            err = [statistics.stdev(d) if len(d) > 1 else 0.0 for _, d in pts]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=colors[source], label=source)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(label_counts) / 1.4, max(label_counts) * 1.4)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(label_counts, [str(L) for L in label_counts])
        ax.set_xlabel("real labels per class")
        ax.set_ylabel("top-1 gain over K = 0, points")
        ax.set_title(f"stage 3: {mode}")
        ax.legend(fontsize=7)
    fig.suptitle("extra labeled images per class: mean ± sd of the per-seed gain", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist5k.yaml")
    p.add_argument("--out", default=str(run_dir(__name__)), help="folder of the runs (default: runs/bench/mechanisms_mnist)")
    p.add_argument("--results", default=str(result_dir(__name__)),
                   help="folder of mechanisms.json and .png (default: benchmarks/results/mechanisms_mnist)")
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["probe", "supervised"], choices=list(MODE_INIT))
    p.add_argument("--semi-labels", type=int, nargs="*", default=[2], help="label counts that run the (costly) semi mode")
    p.add_argument("--semi-sources", nargs="*", default=list(SOURCES[:3]), choices=list(SOURCES[:3]),
                   help="--generators runs: the sources the (costly) semi mode runs (default: all three)")
    p.add_argument("--k", type=int, default=100, help="extra images per class")
    p.add_argument("--pool", type=int, default=200, help="synthetic images generated per class (the filter's pool)")
    p.add_argument("--filter", type=float, default=0.9, help="retrain.filter_conf of the synthetic-f source")
    p.add_argument("--filtered-modes", nargs="*", default=["probe"], choices=list(MODE_INIT),
                   help="modes that also run the synthetic-f source (default: probe)")
    p.add_argument("--encoder", default="", help="stage-0 MAE encoder shared by every run (model.init); needed unless --report-only")
    p.add_argument("--from-run", default="", help="a finished pipeline run per seed (`{seed}` in the path) whose "
                   "stages are the benchmark run's own: stage 0 is that run's (no --encoder), stages 1-2 and the "
                   "generator are reused where their settings are the same")
    p.add_argument("--judge", default="", help="classifier folder trained on all true labels (synthetic class accuracy)")
    p.add_argument("--mixup", type=int, nargs="*", default=[], help="label counts that also run Semi-ViT with pseudo mixup")
    p.add_argument("--cas", type=int, nargs="*", default=[], help="label counts that measure CAS")
    p.add_argument("--cas-modes", nargs="*", default=["probe", "supervised"])
    p.add_argument("--cas-epochs", type=int, default=30, help="finetune.epochs of the supervised CAS classifiers")
    p.add_argument("--only-mixup", action="store_true", help="only the pseudo mixup runs (--mixup), no stage-3 cells")
    p.add_argument("--generators", nargs="*", default=[], choices=list(GENERATORS),
                   help="generators of the synthetic source, compared on the same stage-1 models (default: the config's)")
    p.add_argument("--name", default="mechanisms", help="file name of the JSON and plot in RESULTS")
    p.add_argument("--report-only", action="store_true", help="the table, JSON and plot from the rows already in OUT")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. semi.dist_align=uniform)")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = Path(args.results) / f"{args.name}.json"
    if args.from_run and len(args.seeds) > 1 and "{seed}" not in args.from_run:
        p.error(f"--from-run {args.from_run}: one run per seed is needed, e.g. 'runs/mnist5k_seed{{seed}}' "
                "({seed} stands for each of --seeds)")
    if args.generators and (args.mixup or args.cas or args.only_mixup):
        p.error("--generators runs the K = 0, pseudo-real and per-generator synthetic cells only; "
                "run --mixup/--cas in an invocation without --generators")
    if not args.report_only and not (args.encoder or args.from_run):
        p.error("--encoder (or --from-run) is needed to run stages (e.g. runs/mnist5k_seed0/stage0/encoder.safetensors)")
    if not args.report_only:
        for seed in args.seeds:  # a whole seed at a time: the paired table fills in evenly
            for L in args.labels:
                bench_run(args, L, seed)
    # every run's row (OUT/l*_seed*/bench/row.json), so invocations side by side add up
    merged = {}
    for f in sorted(out.glob("l*_seed*/bench/row.json")):
        r = read_json(f)
        merged[(r["labels"], r["seed"])] = r
    rows = [merged[k] for k in sorted(merged)]
    write_result(results, rows, argv=None if argv is None else [__file__, *argv])
    modes = list(dict.fromkeys([*args.modes, *MODE_INIT]))
    gens = list(dict.fromkeys([*args.generators, *(g for r in rows for g in r.get("generators", {}))]))
    print(generator_table(rows, modes, gens) if gens else table(rows, modes))
    png = results.with_suffix(".png")
    plot(rows, modes, png, gens)
    print(f"\nplot: {png}\nresults: {results}")
    print(json.dumps({"config": args.config, "overrides": args.overrides, "k": args.k, "filter": args.filter}, indent=None))


if __name__ == "__main__":
    main()
