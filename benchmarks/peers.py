"""Against the field: Semi-ViT next to USB's FixMatch, FlexMatch, FreeMatch and SoftMatch and next to
CNN backbones, on the same labeled split, the same start and the same budget, paired over seeds.

For each seed, every cell uses the labeled split of the given run (``RUN/label_split.csv``, through
``data.label_csv``) and the rest of the training images as the unlabeled set:

    finetune     this project's supervised fine-tuning (stage 1a) from --init: the start of every
                 semi-supervised cell below and the supervised baseline
    semivit      Semi-ViT (stage 1b: EMA teacher, probabilistic pseudo mixup), semi.dist_align=none
    semivit-da   the same with semi.dist_align=uniform
    fixmatch, flexmatch, freematch, softmatch
                 USB's algorithms (the ``semilearn`` package, its own loop and algorithm code) from
                 the same fine-tuned model, with the same steps, labeled batch, unlabeled ratio
                 (semi.mu), lr, weight decay, layer decay and EMA momentum (benchmarks/peers_usb.py)
    resnet18, convnext
                 the same two stages (fine-tuning, then Semi-ViT's semi stage, same steps) with a
                 ResNet-18 / ConvNeXt-atto from scratch (small-image stem, model.stem=auto)
    semivit:NAME Semi-ViT with settings of its own (``--variant NAME:semi.KEY=VALUE,...``, e.g.
                 ``--variant tau95:semi.dist_align=uniform,semi.tau=0.95``): the semi stage from the
                 same fine-tuned model with those settings after the config's, one cell per variant,
                 paired against Semi-ViT like the others (what a threshold or a loss weight does)
    dpt          DPT: the pipeline's stage 3 (Semi-ViT again on real + synthetic images), read from
                 the --from-run run where its stages 2-3 finished with these settings (skipped with
                 a message otherwise); its wall seconds are those of stages 1b-3

Every top-1 is the final EMA model's on the held-out split (nothing is selected on it). Each cell
records wall seconds and images/s (images per step = labeled batch + unlabeled batch, unlabeled
images counted once). Results accumulate in RESULTS (a cell already there is read back, so an
interrupted run resumes), and the paired differences against Semi-ViT (mean, sample sd over the
seeds) are printed as a table and stored beside the cells; PLOT shows top-1 per cell with the seeds.

    python -m benchmarks.peers --run runs/mnist5k_seed0 --seeds 0 1 2 --usb-python /work/peers-venv/bin/python
    python -m benchmarks.peers --from-run 'runs/mnist5k_seed{seed}' --seeds 0 1 2 --usb-python ...
    python -m benchmarks.peers --small          # configs/tiny.yaml, a few steps: a check of the harness
    python -m benchmarks.peers --merge a.json b.json --results all.json   # cells made side by side

Cells of one study can be made by processes side by side (each with its own --results, e.g. one
seed or one cell each); ``--merge`` puts them into one file: every file must hold the same settings
(and the same split per seed), a cell found twice must agree, and the provenance lists the command
that made each file (``cells_made_by``).

With --from-run, each seed has its own finished pipeline run (``dpt run``, at least up to stage 1b,
with --config and the same settings): its split, its stage-0 MAE encoder (--init run) and its stage-1
models are that seed's split, init, ``finetune`` cell and Semi-ViT cell (``semivit`` or ``semivit-da``,
whichever ``semi.dist_align`` the config sets; the other is trained). Nothing is trained twice, and
the reference is the pipeline's own Semi-ViT. A run whose stage 1 was made with other settings is an
error, not a silent mismatch. A run finished to its end also gives the ``dpt`` cell. With --init none
(or a weights file) only each run's split is taken: every cell, fine-tuning and Semi-ViT included, is
trained from that start (the from-scratch column on the same splits).

USB cells run in a child process of ``--usb-python`` (default: this Python); where that Python has
no ``semilearn``, they are skipped with a message and the other cells still run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.record import ROOT, provenance, result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.errors import ConfigError
from semivit.files import atomic_write_json, pyplot, read_json
from semivit.runtime.layout import HISTORY, LABEL_SPLIT, METRICS

logger = logging.getLogger("peers")
MODULE = "benchmarks.peers"  # __name__ is "__main__" under python -m

USB_CELLS = ("fixmatch", "flexmatch", "freematch", "softmatch")
OWN_CELLS = ("finetune", "semivit", "semivit-da")
CNN_CELLS = {"resnet18": "resnet18", "convnext": "convnext_atto"}
ALL_CELLS = OWN_CELLS + USB_CELLS + tuple(CNN_CELLS) + ("dpt",)
DPT_STAGES = ("semi", "pseudo-label", "train-diffusion", "generate", "retrain")  # what the dpt cell costs
REFERENCE = "semivit"
SMALL = ["data.max_train=120", "data.max_test=40", "finetune.epochs=1", "semi.epochs=1", "semi.steps_per_epoch=2"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="default configs/mnist5k.yaml (configs/tiny.yaml with --small)")
    p.add_argument("--run", default=None, help="a run folder: its label_split.csv (and stage0 encoder for --init run)")
    p.add_argument("--split", default=None, help="a label_split.csv (instead of --run's)")
    p.add_argument("--from-run", default=None, help="a finished pipeline run per seed, {seed} in the path "
                   "(e.g. 'runs/mnist5k_seed{seed}'): its split, encoder and stage-1 models (see above)")
    p.add_argument("--init", default="run", help="run (the run's stage-0 MAE encoder), none (from scratch) or a path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cells", nargs="+", default=None, choices=ALL_CELLS,
                   help="default: every cell, or with --variant only the variants (and their fine-tuned start)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:semi.KEY=VALUE[,...]",
                   help="also a cell 'semivit:NAME': Semi-ViT with these semi settings (repeatable)")
    p.add_argument("--usb-python", default=sys.executable, help="a Python with semilearn (and this project's deps)")
    p.add_argument("--out", default=None, help="folder of the runs (default runs/bench/peers)")
    p.add_argument("--results", default=None, help="JSON of the cells (default benchmarks/results/peers/)")
    p.add_argument("--small", action="store_true", help="tiny config, 2 steps per stage: a check, numbers meaningless")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="put the cells of these results files (same settings) into --results, then report; trains nothing")
    p.add_argument("--conditions", default=None,
                   help="with --merge: how the cells ran (threads, jobs side by side), added to the provenance after "
                        "the conditions of earlier merges")
    p.add_argument("overrides", nargs="*", help="key=value settings for every cell")
    a = p.parse_args(argv)
    a.config = a.config or str(ROOT / "configs" / ("tiny.yaml" if a.small else "mnist5k.yaml"))
    a.out = Path(a.out or run_dir(MODULE))
    if a.merge and not a.results:
        p.error("--merge needs --results: the file the cells go into (it may already hold some)")
    if a.merge and (a.from_run or a.run or a.split or a.small or a.overrides):
        p.error("--merge trains nothing: give it results files and --results only (the settings are in the files)")
    if a.conditions and not a.merge:
        p.error("--conditions goes with --merge (a run records its own machine and threads)")
    a.variants = {}
    for v in a.variant:
        name, _, settings = v.partition(":")
        pairs = [x.strip() for x in settings.split(",") if x.strip()]
        if not name.replace("-", "").replace("_", "").isalnum() or not pairs:
            p.error(f"--variant '{v}': write NAME:semi.KEY=VALUE[,semi.KEY=VALUE...] (NAME of letters, digits, - or _)")
        bad = [x for x in pairs if not x.startswith("semi.") or "=" not in x]
        if bad:
            p.error(f"--variant '{v}': '{bad[0]}' is not a semi.KEY=VALUE setting; a variant changes the semi stage "
                    "only (it starts from the same fine-tuned model as every cell)")
        if name in a.variants:
            p.error(f"--variant: the name '{name}' is given twice")
        a.variants[name] = pairs
    if a.cells is None:
        a.cells = ["finetune"] if a.variants else list(ALL_CELLS)
    if a.merge and a.variants:
        p.error("--merge trains nothing: leave out --variant (the variant cells are in the files)")
    if a.from_run and (a.run or a.split):
        p.error("--from-run takes each seed's split from its run: leave out --run and --split")
    if a.from_run and len(a.seeds) > 1 and "{seed}" not in a.from_run:
        p.error(f"--from-run '{a.from_run}' has no {{seed}}: every seed would reuse one run's stage-1 models")
    return a


# ----------------------------------------------------------------------------------------------
# the split, the start and the budget
# ----------------------------------------------------------------------------------------------


def label_split(a) -> Path:
    """The labeled split every cell uses: --split, RUN/label_split.csv, or (no run given) one drawn
    by the config's settings into OUT/split/."""
    if a.split:
        return Path(a.split)
    if a.run:
        path = Path(a.run) / LABEL_SPLIT
        if not path.is_file():
            raise SystemExit(f"'{path}' not found: --run must be a run folder whose finetune stage has run")
        return path
    from semivit.data.run_split import run_split
    from semivit.data.sources import build_data

    cfg = load_config(a.config, [f"output_dir={a.out / 'split'}", *base_overrides(a)])
    run_split(cfg, build_data(cfg.data).train, "peers")
    return a.out / "split" / LABEL_SPLIT


def _run_init(a, run: Path) -> str:
    """--from-run: --init run is that run's stage-0 encoder (an error where it has none)."""
    if a.init != "run":
        return a.init
    enc = run / "stage0" / "encoder.safetensors"
    if not enc.is_file():
        raise SystemExit(f"--from-run: '{enc}' not found (--init run needs the run's stage 0); pass --init none or a path")
    return str(enc)


def resolve_init(a) -> str:
    if a.init == "run":
        enc = Path(a.run or "-") / "stage0" / "encoder.safetensors"
        return str(enc) if enc.is_file() else "none"
    return a.init


def base_overrides(a) -> list[str]:
    return [*(SMALL if a.small else []), *a.overrides]


def cell_config(a, split: Path, seed: int, out: Path, *extra: str):
    return load_config(a.config, [*base_overrides(a), f"output_dir={out}", f"seed={seed}",
                                  f"data.label_csv={split}", "pipeline.judge=false", *extra])


def semi_steps(cfg) -> tuple[int, int]:
    """(total optimizer steps, epochs) of the semi stage: semi.steps_per_epoch, else one pass over
    the unlabeled set per epoch."""
    sc = cfg.semi
    per_epoch = sc.steps_per_epoch
    if not per_epoch:
        from semivit.data.run_split import run_split
        from semivit.data.sources import build_data

        split = run_split(cfg, build_data(cfg.data).train, "peers")
        per_epoch = max(1, len(split.unlabeled) // (sc.mu * sc.batch_size))
    return per_epoch * sc.epochs, sc.epochs


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------


def _top1(folder: Path) -> dict:
    m = read_json(Path(folder) / METRICS)
    return {"top1": m.get("top1_ema", m["top1"]), "top1_student": m["top1"],
            "top1_kind": "ema" if "top1_ema" in m else "final"}


def own_finetune(a, split, seed, folder: Path, init: str, model: str | None = None) -> tuple[dict, Path]:
    from semivit.stages.finetune import run_finetune

    extra = [f"model.init={init}"] + ([f"model.name={model}"] if model else [])
    cfg = cell_config(a, split, seed, folder, *extra)
    t0 = time.time()
    out = run_finetune(cfg)
    wall = time.time() - t0
    steps, per_step = _steps(out), cfg.finetune.batch_size
    return {**_top1(out), "wall_s": wall, "images_per_s": steps * per_step / wall, "steps": steps,
            "images_per_step": per_step}, Path(out)


def _steps(folder: Path) -> int:
    """Optimizer steps the stage made (its last history row)."""
    history = read_json(Path(folder) / HISTORY)
    return int(history[-1]["step"]) if history else 0


def _labeled_count(split: Path) -> int:
    return max(0, len(Path(split).read_text().splitlines()) - 1)


def own_semi(a, split, seed, folder: Path, start: Path, out: Path, *extra: str) -> dict:
    from semivit.stages.semi import run_semi

    cfg = cell_config(a, split, seed, folder, *extra)
    t0 = time.time()
    run_semi(cfg, out_dir=out, init=str(start))
    wall = time.time() - t0
    steps = _steps(out)
    per_step = (1 + cfg.semi.mu) * cfg.semi.batch_size
    return {**_top1(out), "wall_s": wall, "images_per_s": steps * per_step / wall, "steps": steps,
            "images_per_step": per_step}


def usb_cell(a, split, seed, folder: Path, start: Path, algorithm: str) -> dict | str:
    """A USB cell in a child process; a string says why it was skipped."""
    cfg = cell_config(a, split, seed, folder)
    steps, epochs = semi_steps(cfg)
    out = folder / f"{algorithm}.json"
    cmd = [a.usb_python, "-m", "benchmarks.peers_usb", "--config", a.config, "--start", str(start),
           "--algorithm", algorithm, "--steps", str(steps), "--epochs", str(epochs), "--seed", str(seed),
           "--out", str(out), *base_overrides(a), f"output_dir={folder}", f"seed={seed}",
           f"data.label_csv={split}", "pipeline.judge=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == 3:
        return proc.stderr.strip().splitlines()[-1]
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"USB cell {algorithm} (seed {seed}) failed:\n{tail}")
    return json.loads(out.read_text())


def seed_run(a, seed: int) -> Path:
    """--from-run: the finished pipeline run of ``seed``."""
    run = Path(a.from_run.format(seed=seed))
    if not (run / LABEL_SPLIT).is_file():
        raise SystemExit(f"--from-run: '{run / LABEL_SPLIT}' not found; run `python -m dpt run --config {a.config} "
                         f"seed={seed} output_dir={run} --until semi` first")
    return run


def run_config(a, run: Path, seed: int):
    """--from-run: the settings the seed's run must have been made with (--config and the overrides)."""
    return load_config(a.config, [*base_overrides(a), f"output_dir={run}", f"seed={seed}"])


def reused_cells(a, run: Path, seed: int) -> dict[str, dict]:
    """The cells a --from-run run has already computed: its fine-tuned model, and its Semi-ViT as the
    cell of the config's ``semi.dist_align``. Each must have finished with --config and the overrides."""
    from dpt.pipeline import finished_with

    cfg = run_config(a, run, seed)
    semi_cell = "semivit" if cfg.semi.dist_align == "none" else "semivit-da" if cfg.semi.dist_align == "uniform" else None
    out = {}
    for cell, stage, folder in (("finetune", "finetune", run / "stage1" / "finetune"),
                                (semi_cell, "semi", run / "stage1" / "semi")):
        if cell is None:
            continue
        if not finished_with(cfg, stage):
            raise SystemExit(f"--from-run: '{folder}' is not a finished {stage} stage made with {a.config} and "
                             f"{' '.join(base_overrides(a)) or 'no overrides'} (seed {seed}); finish the run with "
                             "these settings, or leave out --from-run")
        m = read_json(folder / METRICS)
        steps = _steps(folder)
        per_step = cfg.finetune.batch_size if stage == "finetune" else (1 + cfg.semi.mu) * cfg.semi.batch_size
        wall = float(m.get("seconds") or 0.0)
        out[cell] = {**_top1(folder), "wall_s": wall, "images_per_s": steps * per_step / wall if wall else 0.0,
                     "steps": steps, "images_per_step": per_step, "reused": str(folder)}
    return out


def reused_dpt(a, run: Path, seed: int) -> dict | str:
    """--from-run: the run's stage 3 as the ``dpt`` cell, where stages 2-3 finished with --config and
    the overrides (its wall seconds: stages 1b to 3, what DPT costs after fine-tuning); else why not."""
    from dpt.pipeline import finished_with, stage_seconds

    cfg = run_config(a, run, seed)
    for stage in DPT_STAGES[2:]:
        if not finished_with(cfg, stage):
            return (f"'{run}' has no {stage} stage finished with {a.config} and "
                    f"{' '.join(base_overrides(a)) or 'no overrides'}; run `python -m dpt run --config {a.config} "
                    f"seed={seed} output_dir={run}` to its end for the dpt cell")
    folder = run / "stage3"
    seconds = {stage: stage_seconds(cfg, stage) for stage in DPT_STAGES}
    # a stage run on its own (outside `dpt run`) has no seconds in pipeline.json: named, not counted as 0
    unrecorded = [stage for stage, sec in seconds.items() if sec is None]
    if unrecorded:
        print(f"dpt seed {seed}: wall seconds leave out {', '.join(unrecorded)} (not run by `dpt run`, "
              "no seconds in pipeline.json)", flush=True)
    wall = sum(sec for sec in seconds.values() if sec is not None)
    steps = _steps(folder)
    per_step = (1 + cfg.semi.mu) * cfg.semi.batch_size
    return {**_top1(folder), "wall_s": wall, "stage_seconds": seconds,
            **({"stages_without_seconds": unrecorded} if unrecorded else {}),
            "images_per_s": steps * per_step / seconds["retrain"] if seconds["retrain"] else 0.0,
            "steps": steps, "images_per_step": per_step, "reused": str(folder)}


def run_seed(a, split: Path, seed: int, init: str, done: dict, skipped: dict, save) -> None:
    """The cells of ``seed`` into ``done`` (``cell/seedS``: its measures); why a cell was not measured
    into ``skipped`` (cell: reason)."""
    base = a.out / f"seed{seed}"
    key = lambda cell: f"{cell}/seed{seed}"  # noqa: E731
    vit = base / "vit"
    start = vit / "stage1" / "finetune"
    if a.from_run and a.init == "run":  # another --init: only the run's split, the models are trained
        run = seed_run(a, seed)
        for cell, value in reused_cells(a, run, seed).items():
            if (cell in a.cells or cell == "finetune") and key(cell) not in done:
                done[key(cell)] = value
        start = run / "stage1" / "finetune"
        save()
    needs_start = bool(a.variants) or any(c in a.cells for c in ("finetune", "semivit", "semivit-da", *USB_CELLS))
    if needs_start and (key("finetune") not in done or not (start / METRICS).is_file()):
        done[key("finetune")], start = own_finetune(a, split, seed, vit, init)
        save()
    if "semivit" in a.cells and key("semivit") not in done:
        done[key("semivit")] = own_semi(a, split, seed, vit, start, vit / "semivit", "semi.dist_align=none")
        save()
    if "semivit-da" in a.cells and key("semivit-da") not in done:
        done[key("semivit-da")] = own_semi(a, split, seed, vit, start, vit / "semivit-da", "semi.dist_align=uniform")
        save()
    for name, settings in a.variants.items():
        if key(f"semivit:{name}") not in done:
            cell = own_semi(a, split, seed, vit, start, vit / f"semivit-{name}", *settings)
            done[key(f"semivit:{name}")] = {**cell, "settings": settings}
            save()
    for alg in USB_CELLS:
        if alg in a.cells and key(alg) not in done:
            cell = usb_cell(a, split, seed, vit, start, alg)
            if isinstance(cell, str):
                print(f"{alg} seed {seed}: skipped: {cell}", flush=True)
                skipped[alg] = cell
                continue
            done[key(alg)] = cell
            save()
    for cell, model in CNN_CELLS.items():
        if cell in a.cells and key(cell) not in done:
            folder = base / cell
            ft, ft_dir = own_finetune(a, split, seed, folder, "none", model)
            semi = own_semi(a, split, seed, folder, ft_dir, folder / "semivit", f"model.name={model}",
                            "model.init=none", "semi.dist_align=none")
            semi.update(model=model, finetune_top1=ft["top1"], wall_s=ft["wall_s"] + semi["wall_s"],
                        finetune_wall_s=ft["wall_s"])
            done[key(cell)] = semi
            save()
    if "dpt" in a.cells and key("dpt") not in done:
        cell = reused_dpt(a, seed_run(a, seed), seed) if a.from_run and a.init == "run" else (
            "the dpt cell is read from a pipeline run finished to stage 3 (its MAE start): give --from-run "
            "and no --init")
        if isinstance(cell, str):
            print(f"dpt seed {seed}: skipped: {cell}", flush=True)
            skipped["dpt"] = cell
        else:
            done[key("dpt")] = cell
            save()


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def cells_by_name(done: dict) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for k, v in done.items():
        if "/seed" in k:
            cell, seed = k.split("/seed")
            out.setdefault(cell, {})[int(seed)] = v
    return out


def cell_order(cells) -> list[str]:
    """The cells in table order: the fixed ones, then the Semi-ViT variants by name."""
    return [c for c in ALL_CELLS if c in cells] + sorted(c for c in cells if c not in ALL_CELLS)


def paired(done: dict) -> dict:
    """Per cell: mean, sd of top-1 over seeds and the paired difference against Semi-ViT."""
    cells = cells_by_name(done)
    ref = cells.get(REFERENCE, {})
    table = {}
    for cell in cell_order(cells):
        runs = cells[cell]
        tops = [runs[s]["top1"] for s in sorted(runs)]
        row = {"seeds": sorted(runs), "top1_mean": statistics.fmean(tops),
               "top1_sd": statistics.stdev(tops) if len(tops) > 1 else None,
               "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs.values()),
               "images_per_s_mean": statistics.fmean(r["images_per_s"] for r in runs.values())}
        common = sorted(set(runs) & set(ref))
        if cell != REFERENCE and common:
            diffs = [runs[s]["top1"] - ref[s]["top1"] for s in common]
            row.update(diff_vs_semivit_mean=statistics.fmean(diffs),
                       diff_vs_semivit_sd=statistics.stdev(diffs) if len(diffs) > 1 else None,
                       diff_seeds=common)
        table[cell] = row
    return table


def markdown(table: dict) -> str:
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    lines = ["| cell | seeds | top-1 (mean ± sd) | vs Semi-ViT (paired mean ± sd) | wall s | images/s |",
             "|---|---|---|---|---|---|"]
    for cell, r in table.items():
        diff = "0 (reference)" if cell == REFERENCE else (
            f"{r['diff_vs_semivit_mean']:+.1f} ± {f(r['diff_vs_semivit_sd'])}" if "diff_vs_semivit_mean" in r else "-")
        lines.append(f"| {cell} | {len(r['seeds'])} | {r['top1_mean']:.1f} ± {f(r['top1_sd'])} | {diff} | "
                     f"{r['wall_s_mean']:.0f} | {r['images_per_s_mean']:.1f} |")
    return "\n".join(lines)


def plot(done: dict, path: Path) -> None:
    plt = pyplot()
    cells = cells_by_name(done)
    names = cell_order(cells)
    fig, ax = plt.subplots(figsize=(1.1 * max(4, len(names)) + 1, 3.6))
    every = []
    for i, cell in enumerate(names):
        tops = [cells[cell][s]["top1"] for s in sorted(cells[cell])]
        every += tops
        ax.hlines(statistics.fmean(tops), i - 0.3, i + 0.3, color="tab:orange" if cell == REFERENCE else "tab:blue", lw=3)
        ax.scatter([i] * len(tops), tops, color="k", s=12, zorder=3)
    if every:  # the axis spans the cells, so differences of a point stay visible
        ax.set_ylim(max(0.0, min(every) - 2), min(100.0, max(every) + 1))
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("top-1 (final EMA model, %)")
    ax.set_title("same split, start and steps; dots: seeds, lines: mean")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cells(results: dict) -> dict:
    return {k: v for k, v in results.get("cells", {}).items() if k != "skipped"}


def _read_results(path: Path) -> dict:
    """A results file this script wrote (provenance + settings + cells), or a one-line error naming it."""
    if not path.is_file():
        raise SystemExit(f"--merge: '{path}' not found")
    data = read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("results"), dict) and "settings" in data["results"]):
        raise SystemExit(f"--merge: '{path}' is not a results file of benchmarks.peers")
    return data


def _add_conditions(before: str | None, new: str | None) -> str | None:
    """The conditions of earlier merges with this merge's own after them: a merge adds, it never erases."""
    if not new or (before and new in before.split("; ")):
        return before or new
    return f"{before}; {new}" if before else new


def merge(a) -> int:
    """--merge: the cells of several results files of one study in one file (see the module's text)."""
    target = Path(a.results)
    settings, done, made_by, conditions = None, {}, [], a.conditions
    if target.is_file():
        data = _read_results(target)
        settings, done = data["results"]["settings"], _cells(data["results"])
        prov = data.get("provenance", {})
        made_by = list(prov.get("cells_made_by") or [prov.get("command", str(target))])
        conditions = _add_conditions(prov.get("conditions"), conditions)
    for source in map(Path, a.merge):
        data = _read_results(source)
        settings = settings if settings is not None else data["results"]["settings"]
        if data["results"]["settings"] != settings:
            raise SystemExit(f"--merge: '{source}' holds cells of other settings ({data['results']['settings']}) "
                             f"than {target if target.is_file() else a.merge[0]} ({settings}); merge it into another --results")
        for key, cell in _cells(data["results"]).items():
            seed = key.split("/seed")[1]
            other = next((v for k, v in done.items() if k.endswith(f"/seed{seed}")), None)
            if other is not None and other.get("split_sha256") != cell.get("split_sha256"):
                why = ("another split than" if other.get("split_sha256") and cell.get("split_sha256") else
                       "no split digest to compare with")
                raise SystemExit(f"--merge: '{source}' has {key} on {why} the cells of seed {seed} already merged; "
                                 "these are not the same study (or a file of a run still in progress)")
            if key in done and done[key]["top1"] != cell["top1"]:
                raise SystemExit(f"--merge: {key} is in two files with different top-1 ({done[key]['top1']} and "
                                 f"{cell['top1']} in '{source}'); keep one of the runs")
            done.setdefault(key, cell)
        prov = data.get("provenance", {})
        made_by += [c for c in prov.get("cells_made_by") or [prov.get("command", str(source))] if c not in made_by]
    extra = {"cells_made_by": made_by, **({"conditions": conditions} if conditions else {})}
    atomic_write_json(target, {"provenance": {**provenance(), **extra},
                               "results": {"settings": settings, "cells": done, "paired": paired(done)}})
    plot(done, target.with_suffix(".png"))
    print(markdown(paired(done)))
    print(f"results: {target} ({len(done)} cells from {len(a.merge)} file(s))")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    a = parse(argv)
    if a.merge:
        return merge(a)
    for name, settings in a.variants.items():  # a misspelt setting stops here, not after hours of other cells
        try:
            load_config(a.config, [*base_overrides(a), *settings])
        except ConfigError as e:
            raise SystemExit(f"--variant {name}: {e}") from None
    a.out.mkdir(parents=True, exist_ok=True)
    if a.from_run:  # each seed: its run's split and encoder
        splits = {seed: seed_run(a, seed) / LABEL_SPLIT for seed in a.seeds}
        inits = {seed: _run_init(a, splits[seed].parent) for seed in a.seeds}
    else:
        split = label_split(a)
        splits = dict.fromkeys(a.seeds, split)
        inits = dict.fromkeys(a.seeds, resolve_init(a))
    first = a.seeds[0]
    init = inits[first]
    init_tag = "scratch" if init == "none" else "mae" if init.endswith("encoder.safetensors") else "init"
    runs_tag = "_runs" if a.from_run else ""
    name = f"peers_l{_labeled_count(splits[first])}_{init_tag}{runs_tag}{'_small' if a.small else ''}"
    results = Path(a.results) if a.results else (a.out if a.small else result_dir(MODULE)) / f"{name}.json"
    if a.from_run:  # one split per seed: each cell records its own (below)
        settings = {"config": a.config, "from_run": a.from_run, "num_labeled": _labeled_count(splits[first]),
                    "init": "none" if init == "none" else "run" if a.init == "run" else init,
                    "overrides": base_overrides(a)}
    else:
        settings = {"config": a.config, "split_sha256": hashlib.sha256(split.read_bytes()).hexdigest(),
                    "num_labeled": _labeled_count(split), "init": init, "overrides": base_overrides(a)}
    done: dict = {}
    if results.is_file():  # resume: the cells there were made with these settings, or it is another study
        earlier = read_json(results).get("results", {})
        if earlier.get("settings") != settings:
            raise SystemExit(f"'{results}' holds cells of other settings ({earlier.get('settings')}); "
                             "pass another --results (and --out) for these")
        done = earlier.get("cells", {})
    done.pop("skipped", None)  # files written before the reasons had a key of their own
    skipped: dict[str, str] = {}

    def save() -> None:
        write_result(results, {"settings": settings, "cells": done, "paired": paired(done),
                               **({"skipped": skipped} if skipped else {})})

    for seed in a.seeds:
        # a copy beside the runs (the run folder may move), one per seed where the splits differ
        local_split = a.out / (f"seed{seed}" if a.from_run else "") / LABEL_SPLIT
        local_split.parent.mkdir(parents=True, exist_ok=True)
        if splits[seed].resolve() != local_split.resolve():
            shutil.copyfile(splits[seed], local_split)
        digest = hashlib.sha256(local_split.read_bytes()).hexdigest()
        if a.from_run:
            other = [k for k, v in done.items() if k.endswith(f"/seed{seed}") and v.get("split_sha256") != digest]
            if other:
                raise SystemExit(f"'{results}' holds cells of seed {seed} made on another split ({other[0]}); "
                                 "pass another --results (and --out) for this run")
        before = set(done)

        def save_seed(before: set = before, digest: str = digest) -> None:
            # with --from-run each new cell records its seed's split as it is saved
            if a.from_run:
                for k in set(done) - before:
                    done[k].setdefault("split_sha256", digest)
            save()

        run_seed(a, local_split, seed, inits[seed], done, skipped, save_seed)
    save()
    plot(done, results.with_suffix(".png"))
    print(markdown(paired(done)))
    for alg, why in skipped.items():
        print(f"{alg}: not measured: {why}")
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
