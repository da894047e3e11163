"""Scale model: memory per rank and seconds of every stage that touches every image, at several
data set sizes on 1 and 2 ranks, fitted as fixed + per-image cost and extrapolated to ImageNet
(1,281,167 images) on 8 ranks.

    python -m benchmarks.scale                 # 1000 classes; 2k, 4k, 8k images; 1 and 2 ranks
    python -m benchmarks.scale --small         # 20 classes, tiny counts (the tests)

It writes an ImageNet-like folder per size (``train/<class>/*.JPEG`` of random sizes and aspect
ratios, ``val/``) and runs each stage in fresh processes (2 ranks: ``accelerate launch
--multi_gpu --num_processes 2`` with ACCELERATE_USE_CPU=1) with the tiny config's models (a
micro ViT classifier, a two-level VAE, a one-block DiT; random weights from tests/helpers):

- ``scan``: the image folder listed (and the list stored in the run's cache/images/) and the
  labeled split drawn (build_data + run_split);
- ``pseudo_label``: ``semivit pseudo-label`` (per-rank part files, merged by rank 0);
- ``latents``: the latent cache built (each rank its shard) and one epoch of per-batch reads;
- ``generate``: ``dpt generate``, as many images as the data set has;
- ``fid``: ``dpt fid`` of the generated set against the training set (reference statistics
  computed and stored), with the classifier's features: the per-image memory of the Inception
  path is the same (a batch's features), only its fixed cost and seconds differ.

Each rank records its seconds and its peak anonymous memory (``RssAnon`` of /proc/self/status,
sampled every 5 ms: heap and tensors, not the page cache of memory-mapped or read files). Per
stage and rank count, least squares give fixed + slope x n; the JSON (benchmarks/results/scale/)
holds per stage ``n``, ``ranks``, ``seconds``, ``rss_anon_mb`` (max over ranks),
``rss_anon_mb_per_1k_images`` (the fitted slope, the larger of the 1- and 2-rank fits) and
``extrapolated``: seconds at 1.28M images on 8 ranks (the 2-rank fit's per-image seconds x 2/8,
i.e. perfect scaling from 2 to 8 ranks assumed, plus its fixed seconds) and memory (fixed + slope x
1.28M: the slope is taken against the whole data set, not the rank's share, so an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.record import result_dir, run_dir, write_result

IMAGENET_TRAIN = 1_281_167
TARGET_RANKS = 8
STAGES = ("scan", "pseudo_label", "latents", "generate", "fid")
SIZE = 16  # the tiny config's image size
SCRIPT = "benchmarks.scale"  # __name__ is "__main__" under python -m


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """The largest RssAnon seen while it runs (a thread polls /proc/self/status)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, rss_anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


# --------------------------------------------------------------------------------------------
# The data and the models
# --------------------------------------------------------------------------------------------


def class_names(num_classes: int) -> list[str]:
    return [f"n{i:08d}" for i in range(num_classes)]  # WordNet-id-like folder names


def write_imagefolder(root: Path, n: int, num_classes: int, held_out: int, seed: int = 0,
                      sides: tuple[int, int] = (24, 128)) -> Path:
    """``root/train/<class>/*.JPEG`` (n images, spread over the classes) and ``root/val/``; JPEGs
    of random sizes and aspect ratios (1:2 to 2:1), some grayscale. Written once per size."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    classes = class_names(num_classes)
    for split, count in (("train", n), ("val", held_out)):
        for k in range(count):
            c = classes[k % num_classes]
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            side = rng.integers(*sides)
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            h, w = max(8, int(side / np.sqrt(aspect))), max(8, int(side * np.sqrt(aspect)))
            base = rng.integers(0, 256, 3)
            img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            pil = Image.fromarray(img)
            if k % 7 == 0:
                pil = pil.convert("L")
            pil.save(folder / f"{c}_{k:08d}.JPEG", quality=90)
    done.write_text("ok")
    return root


def _tiny_models():
    """tests/helpers/tiny_models.py, loaded from its file (an installed package may own the name
    ``tests``)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("scale_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_models(work: Path, num_classes: int) -> None:
    tiny = _tiny_models()
    make_tiny_classifier, make_tiny_generator, make_tiny_vae = (
        tiny.make_tiny_classifier, tiny.make_tiny_generator, tiny.make_tiny_vae)
    classes = class_names(num_classes)
    if not (work / "clf" / "meta.json").is_file():
        make_tiny_classifier(work / "clf", classes, size=SIZE)
    if not (work / "vae" / "config.json").is_file():
        make_tiny_vae(work / "vae", SIZE)
    if not (work / "gen").is_dir():
        make_tiny_generator(work / "gen", classes, size=SIZE)


# --------------------------------------------------------------------------------------------
# One stage on one rank (run in its own process)
# --------------------------------------------------------------------------------------------


def overrides(work: Path, n: int, ranks: int, stage: str) -> list[str]:
    return [f"output_dir={work / f'run-{stage}-{n}-r{ranks}'}", "data.name=imagefolder",
            f"data.root={work / f'data-{n}'}", f"data.image_size={SIZE}", "data.labels_per_class=1",
            "model.name=vit_micro_patch4", "tensorboard=false", "pseudo_label.batch_size=64", "data.num_workers=0"]


def run_stage(stage: str, work: Path, n: int, ranks: int, num_classes: int) -> None:
    """Runs ``stage`` on this rank and writes ``<run>/scale-<rank>.json``."""
    import torch

    from semivit.config.load import load_config
    from semivit.runtime.accelerator import distributed_state, leave_process_group

    torch.set_num_threads(1)
    state = distributed_state()
    args = overrides(work, n, ranks, stage)
    synthetic = work / f"synthetic-{n}"
    if stage == "generate":
        args += [f"generate.model={work / 'gen'}", f"generate.out={work / f'run-generate-{n}-r{ranks}' / 'synthetic'}",
                 f"generate.num_per_class={max(1, n // num_classes)}", "generate.steps=2", "generate.batch_size=64"]
    if stage == "fid":
        args += ["fid.reference=train", f"fid.fake={synthetic}", "fid.features=classifier",
                 f"fid.classifier={work / 'clf'}", "fid.batch_size=64"]
    cfg = load_config(None, args)
    state.wait_for_everyone()
    t0 = time.time()
    with PeakSampler() as peak:
        baseline = rss_anon_mb()
        if stage == "scan":
            from semivit.data.run_split import run_split
            from semivit.data.sources import build_data
            from semivit.runtime.layout import layout

            run_split(cfg, build_data(cfg.data, layout(cfg).image_lists).train, "scale")
        elif stage == "pseudo_label":
            from semivit.stages.pseudo_label import run_pseudo_label

            run_pseudo_label(cfg, checkpoint=str(work / "clf"))
        elif stage == "latents":
            _latents(cfg, work)
        elif stage == "generate":
            from dpt.generate import run_generate

            run_generate(cfg, check_data=False)
        elif stage == "fid":
            from dpt.fid import run_fid

            run_fid(cfg)
        state.wait_for_everyone()
    seconds = time.time() - t0
    out = cfg.run_dir / f"scale-{state.process_index}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stage": stage, "n": n, "ranks": ranks, "rank": state.process_index,
                               "seconds": seconds, "rss_anon_mb": peak.peak, "rss_anon_mb_at_start": baseline}))
    leave_process_group()


def _latents(cfg, work: Path) -> None:
    """The cache built (each rank its shard), then one epoch of batches read from it."""
    import torch

    from dpt.diffusion.codec import load_vae
    from dpt.diffusion.latents import load_or_build_latents
    from semivit.data.sources import build_data
    from semivit.runtime.accelerator import make_accelerator

    bundle = build_data(cfg.data)
    acc = make_accelerator(cfg, cfg.run_dir / "latents")
    vae = load_vae(str(work / "vae")).to(acc.device)
    latents = load_or_build_latents(cfg.run_dir / "cache", bundle.train, np.arange(len(bundle.train)), vae, SIZE, 3,
                                    True, 64, acc)
    order = np.random.default_rng(acc.process_index).permutation(len(latents))
    mine = np.array_split(order, acc.num_processes)[acc.process_index]
    for start in range(0, len(mine), 64):
        rows = torch.as_tensor(mine[start : start + 64])
        latents.sample(rows, torch.rand(len(rows)) < 0.5)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def launch(stage: str, work: Path, n: int, ranks: int, num_classes: int, port: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = ["-m", "benchmarks.scale", "--worker", stage, "--work", str(work), "--n", str(n), "--ranks", str(ranks),
              "--classes", str(num_classes)]
    if ranks == 1:
        cmd = [sys.executable, *worker]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), *worker]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} (n={n}, {ranks} ranks) failed:\n{proc.stderr[-4000:]}")
    run = work / f"run-{stage}-{n}-r{ranks}"
    return [json.loads((run / f"scale-{r}.json").read_text()) for r in range(ranks)]


def fit(ns, values) -> tuple[float, float]:
    """(fixed, per image) of least squares values = fixed + per_image * n."""
    slope, fixed = np.polyfit(np.asarray(ns, dtype=float), np.asarray(values, dtype=float), 1)
    return float(fixed), float(slope)


def summarize(records: list[dict], sizes: list[int], rank_counts: list[int]) -> dict:
    out = {}
    for stage in STAGES:
        runs, fits = [], {}
        for ranks in rank_counts:
            mine = [r for r in records if r["stage"] == stage and r["ranks"] == ranks]
            by_n = {n: [r for r in mine if r["n"] == n] for n in sizes}
            for n in sizes:
                runs.append({"n": n, "ranks": ranks, "seconds": round(max(r["seconds"] for r in by_n[n]), 2),
                             "rss_anon_mb": round(max(r["rss_anon_mb"] for r in by_n[n]), 1),
                             "rss_anon_mb_per_rank": [round(r["rss_anon_mb"], 1) for r in sorted(by_n[n], key=lambda r: r["rank"])]})
            sec = fit(sizes, [max(r["seconds"] for r in by_n[n]) for n in sizes])
            per_rank = [fit(sizes, [next(r["rss_anon_mb"] for r in by_n[n] if r["rank"] == k) for n in sizes])
                        for k in range(ranks)]
            mem = max(per_rank, key=lambda f: f[1])
            fits[str(ranks)] = {"seconds_fixed": round(sec[0], 2), "seconds_per_1k_images": round(1000 * sec[1], 3),
                                "rss_anon_mb_fixed": round(mem[0], 1), "rss_anon_mb_per_1k_images": round(1000 * mem[1], 3)}
        slope = max(f["rss_anon_mb_per_1k_images"] for f in fits.values())
        base = fits[str(max(rank_counts))]
        r = max(rank_counts)
        seconds = max(0.0, base["seconds_fixed"]) + max(0.0, base["seconds_per_1k_images"]) / 1000 * IMAGENET_TRAIN * r / TARGET_RANKS
        memory = max(f["rss_anon_mb_fixed"] for f in fits.values()) + max(0.0, slope) / 1000 * IMAGENET_TRAIN
        out[stage] = {
            "n": sizes, "ranks": rank_counts, "runs": runs, "fits": fits,
            "seconds": {str(r): [x["seconds"] for x in runs if x["ranks"] == r] for r in rank_counts},
            "rss_anon_mb": {str(r): [x["rss_anon_mb"] for x in runs if x["ranks"] == r] for r in rank_counts},
            "rss_anon_mb_per_1k_images": slope,
            "extrapolated": {"n": IMAGENET_TRAIN, "ranks": TARGET_RANKS, "seconds": round(seconds, 1),
                             "hours": round(seconds / 3600, 2), "rss_anon_mb": round(memory, 1)},
            "within_target": slope <= 2.0,
        }
    return out


def markdown_table(result: dict) -> str:
    """The table "ImageNet on 8 ranks, per rank" from a result JSON (every number from it)."""
    res = result["results"]
    sizes, ranks = res["sizes"], res["rank_counts"]
    lines = [
        f"| stage | seconds at n = {' / '.join(f'{n:,}' for n in sizes)} ({' ; '.join(f'{r} rank' + ('s' if r > 1 else '') for r in ranks)}) "
        f"| peak RssAnon per rank at the same n, MB ({max(ranks)} ranks, larger rank) | fitted slope, MB per 1k images | at {IMAGENET_TRAIN:,} images on "
        f"{TARGET_RANKS} ranks: RssAnon per rank, MB | hours (CPU, tiny models) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, r in res["stages"].items():
        secs = " ; ".join(" / ".join(f"{s:.1f}" for s in r["seconds"][str(k)]) for k in ranks)
        mem = " / ".join(f"{m:.0f}" for m in r["rss_anon_mb"][str(max(ranks))])
        e = r["extrapolated"]
        lines.append(f"| {stage} | {secs} | {mem} | {r['rss_anon_mb_per_1k_images']:+.3f} | {e['rss_anon_mb']:.0f} | {e['hours']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="20 classes, 40/80/120 images, 1 rank: a check, not numbers")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="training images per data set (default 2000 4000 8000)")
    p.add_argument("--classes", type=int, default=None, help="classes (default 1000)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="rank counts (default 1 2)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--work", default=str(run_dir(SCRIPT)), help="data, models and runs")
    p.add_argument("--out", default="", help="result JSON (default benchmarks/results/scale/scale.json; --small: WORK/scale.json)")
    p.add_argument("--table", default="", metavar="JSON", help="print the markdown table of a result JSON and stop")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    classes = args.classes or (20 if args.small else 1000)
    work = Path(args.work) / ("small" if args.small else "full")
    if args.worker:
        run_stage(args.worker, Path(args.work), args.n, args.ranks[0], classes)
        return 0
    sizes = args.sizes or ([40, 80, 120] if args.small else [2000, 4000, 8000])
    rank_counts = args.ranks or ([1] if args.small else [1, 2])
    work.mkdir(parents=True, exist_ok=True)
    prepare_models(work, classes)
    records = []
    port = 29600 + os.getpid() % 200
    for n in sizes:
        write_imagefolder(work / f"data-{n}", n, classes, held_out=max(classes, n // 10))
        for stage in args.stages:
            for ranks in rank_counts:
                import shutil

                shutil.rmtree(work / f"run-{stage}-{n}-r{ranks}", ignore_errors=True)  # every stage from scratch
                recs = launch(stage, work, n, ranks, classes, port)
                records += recs
                print(f"{stage:13s} n={n:6d} ranks={ranks} {max(r['seconds'] for r in recs):7.1f} s  "
                      "RssAnon " + ", ".join(f"{r['rss_anon_mb']:.0f}" for r in recs) + " MB", flush=True)
                if stage == "generate" and ranks == rank_counts[0]:  # the set FID compares
                    shutil.rmtree(work / f"synthetic-{n}", ignore_errors=True)
                    shutil.copytree(work / f"run-generate-{n}-r{ranks}" / "synthetic", work / f"synthetic-{n}")
    stages = [s for s in STAGES if s in args.stages]
    result = {
        "what": "per rank: seconds and peak RssAnon of each stage that touches every image; fixed + per-image fit; "
                f"extrapolated to {IMAGENET_TRAIN} images on {TARGET_RANKS} ranks",
        "classes": classes, "sizes": sizes, "rank_counts": rank_counts, "image_sides": [24, 128],
        "models": "tiny config: vit_micro_patch4 classifier, 2-level AutoencoderKL (8, 16), DiT 1 block x 32, 16 px",
        "stages": {k: v for k, v in summarize(records, sizes, rank_counts).items() if k in stages},
        "records": records,
    }
    out = Path(args.out) if args.out else (work / "scale.json" if args.small else result_dir(SCRIPT) / "scale.json")
    write_result(out, result)
    print(f"-> {out}")
    for stage, r in result["stages"].items():
        e = r["extrapolated"]
        print(f"{stage:13s} slope {r['rss_anon_mb_per_1k_images']:+.3f} MB/1k images; at {IMAGENET_TRAIN} on "
              f"{TARGET_RANKS} ranks: {e['rss_anon_mb']:.0f} MB, {e['hours']:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
