"""Generator variants at equal stage-2 steps, judged by what a person sees and what a classifier learns.

Each variant trains the stage-2 generator with its own settings (same data, epochs and batch size:
the same number of optimizer steps) or only samples another variant's generator differently
(``generate.*`` overrides only), writes N images per class, and is measured by:

    texture             dpt.quality: isolated-pixel rate, fragments per digit, total variation,
                        for the synthetic images and for the real test images (with the spread of
                        real sets as large as the synthetic one)
    class accuracy      a judge (trained on all true training labels) agrees with the class asked for
    CAS                 a classifier trained on the synthetic images alone, top-1 on the real test
                        images, next to the same classifier trained on N real images per class
    stage-2 seconds     wall and CPU seconds of train-diffusion (and of generate)

and one PNG per variant puts its digits beside real digits of the same classes.

Two modes. With ``--run RUN`` (a finished pipeline run: stage 0/1, pseudo-labels, judge) the
variants train on the run's pseudo-labels, the judge is the run's ceiling model and CAS is the
README's probe (logistic regression on the frozen MAE encoder). Without ``--run`` (the oracle
mode: no stage 0/1 needed) the variants train on the true labels (``diffusion.labels=true``), and
judge and CAS use dpt.quality's small pixel CNN (the judge trained on the 4000 training digits).

    python -m benchmarks.generator_mnist --n 50 --variant baseline: \\
        --variant gi30:generate.guidance_min_t=0.3 --variant unet:diffusion.model=unet
    python -m benchmarks.generator_mnist --run runs/mnist5k_seed0 --variant baseline: ...
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.files import atomic_write_json, pyplot, read_json
from semivit.runtime.layout import METRICS, RELATIVE, RunLayout

SCRIPT = "benchmarks.generator_mnist"  # run_dir / result_dir name (__name__ is __main__ under -m)
TRAIN_KEYS = ("diffusion.",)  # a variant that changes these trains its own generator


def trains(args, name: str, overrides: list[str]) -> bool:
    if any(o.startswith(TRAIN_KEYS) for o in overrides):
        return True
    return not args.run and name == args.base  # oracle mode: the base variant trains the shared generator


def variant_run(args, name: str, overrides: list[str]) -> Path:
    """The variant's run folder: the source run's (or the base variant's) files linked in, its own stage 2
    when it trains one."""
    source = Path(args.run) if args.run else Path(args.out) / args.base
    run = Path(args.out) / name
    run.mkdir(parents=True, exist_ok=True)
    links = [RELATIVE.stage0, RELATIVE.stage1, Path("label_split.csv"), Path("label_split.json")] if args.run else []
    if not trains(args, name, overrides):
        links.append(RELATIVE.stage2)
    own = source / RELATIVE.synthetic / METRICS
    if args.run and not overrides and own.is_file() and read_json(own).get("num_per_class") == args.n:
        links.append(RELATIVE.synthetic)  # the run's own generator and images, as many as asked for
    for rel in links:
        src, dst = source / rel, run / rel
        if dst.exists() or not src.exists() or src.resolve() == dst.resolve():
            continue
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=os.link)
        else:
            os.link(src, dst)
    return run


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, *a, **kw) -> tuple[float, float]:
    w, c = time.time(), cpu_seconds()
    fn(*a, **kw)
    return time.time() - w, cpu_seconds() - c


class PixelJudge:
    """The oracle mode's judge and CAS: dpt.quality's small CNN, cached per benchmark folder."""

    def __init__(self, cfg, out: Path, n: int, seed: int):
        from dpt.quality import load_images, per_class_sample
        from semivit.data.sources import build_data

        bundle = build_data(cfg.data)
        size = cfg.diffusion.image_size or cfg.data.image_size  # the generator's resolution
        self.train, self.train_labels = load_images(bundle.train, size=size)
        self.test, self.test_labels = load_images(bundle.test, size=size)
        self.k = bundle.num_classes
        self.seed = seed
        cache = out / "pixel_judge.json"
        info = read_json(cache) if cache.is_file() else {}
        weights = out / "pixel_judge.safetensors"
        if weights.is_file() and "judge_test_top1" in info:
            from dpt.quality import small_cnn
            from semivit.files import load_weights

            self.judge = small_cnn(self.k)
            self.judge(torch.zeros(1, 1, *self.train.shape[1:]))  # materialise the lazy head
            self.judge.load_state_dict(load_weights(weights))
            self.judge.eval()
        else:
            from semivit.files import save_weights

            self.judge = self._fit(self.train, self.train_labels)
            save_weights(self.judge.state_dict(), weights)
            info.pop("judge_test_top1", None)
        if "judge_test_top1" not in info:
            from dpt.quality import cnn_accuracy

            info["judge_test_top1"] = cnn_accuracy(self.judge, self.test, self.test_labels)
        key = f"cas_real_{n}"
        if key not in info:
            pick = per_class_sample(self.train_labels, list(range(self.k)), n, seed)
            info[key] = self.cas(self.train[pick], self.train_labels[pick])
        atomic_write_json(cache, info)
        self.info, self.cas_real = info, info[key]

    def _fit(self, images, labels):
        from dpt.quality import train_cnn

        return train_cnn(images, labels, self.k, seed=self.seed)

    def cas(self, images, labels) -> float:
        from dpt.quality import cnn_accuracy, train_cnn

        # as many updates as on the 4000 training digits: the small sets do not under-train
        epochs = max(8, round(8 * len(self.train) / max(1, len(images))))

        return cnn_accuracy(train_cnn(images, labels, self.k, epochs=epochs, seed=self.seed), self.test,
                            self.test_labels)


def measure(args, name: str, overrides: list[str], pixel: PixelJudge | None) -> dict:
    from dpt.generate import load_synthetic_source, run_generate
    from dpt.quality import cnn_predict, comparison_grid, load_images, real_spread, texture_measures
    from dpt.train_diffusion import run_train_diffusion

    run = variant_run(args, name, overrides)
    result_file = run / "generator_bench.json"
    if result_file.is_file():
        return read_json(result_file)
    base = [f"output_dir={run}", f"seed={args.seed}", f"generate.num_per_class={args.n}", *args.overrides]
    if not args.run:
        base.append("diffusion.labels=true")
    cfg = load_config(args.config, [*base, *overrides])
    lay = RunLayout(run)
    row: dict = {"variant": name, "overrides": overrides, "mode": "run" if args.run else "oracle"}
    if not (lay.stage2 / METRICS).is_file():
        row["stage2_wall_seconds"], row["stage2_cpu_seconds"] = timed(run_train_diffusion, cfg)
    if not (lay.synthetic / METRICS).is_file():
        row["generate_wall_seconds"], row["generate_cpu_seconds"] = timed(run_generate, cfg)
    stage2 = read_json(lay.stage2 / METRICS)
    row["stage2_seconds"] = stage2.get("seconds")
    row["stage2_steps"] = stage2.get("steps")

    # texture, real against synthetic, and the side-by-side grid
    from semivit.data.sources import build_data

    test = build_data(cfg.data).test
    classes = list(test.classes)
    fake, fake_labels = load_images(load_synthetic_source(lay.synthetic, classes, channels=1))
    real, real_labels = load_images(test, size=fake.shape[1])
    row["texture_synthetic"] = texture_measures(fake)
    row["texture_real"] = texture_measures(real)
    row["texture_real_spread"] = real_spread(real, len(fake), seed=args.seed)
    comparison_grid(real, real_labels, fake, fake_labels, run / "real_vs_synthetic.png", seed=args.seed)

    if pixel is not None:
        row["judge"] = "pixel CNN on the 4000 training digits"
        row["synthetic_class_acc"] = float(100 * np.mean(cnn_predict(pixel.judge, fake) == fake_labels))
        row["cas_synthetic"] = pixel.cas(fake, fake_labels)
        row["cas_real"] = pixel.cas_real
        row["cas_kind"] = "pixel CNN trained on the images alone"
    else:
        from dpt.fid import run_fid, synthetic_class_accuracy
        from dpt.retrain import run_retrain

        row["synthetic_class_acc"] = synthetic_class_accuracy(args.judge, lay.synthetic)["synthetic_class_acc"]
        fid_cfg = load_config(args.config, [*base, *overrides, "fid.features=classifier",
                                            f"fid.classifier={args.judge}", f"fid.out={run / 'fid_judge.json'}"])
        row["fid"] = run_fid(fid_cfg)["fid"]
        probe = ["retrain.mode=probe", "retrain.synthetic_only=true", "retrain.init=stage0",
                 f"retrain.synthetic_per_class={args.n}"]
        for source in ("synthetic", "real"):
            out = run / f"cas_probe_{source}"
            if not (out / METRICS).is_file():
                run_retrain(load_config(args.config, [*base, *overrides, *probe, f"retrain.source={source}"]),
                            out_dir=out)
            row[f"cas_{source}"] = read_json(out / METRICS)["top1"]
        row["cas_kind"] = "probe on the frozen MAE encoder"
    atomic_write_json(result_file, row)
    return row


def grids(rows: list[dict], out: Path, path: Path) -> None:
    plt = pyplot()
    from PIL import Image

    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 4.2 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        t = r["texture_synthetic"]
        ax.imshow(Image.open(out / r["variant"] / "real_vs_synthetic.png"), cmap="gray", interpolation="nearest")
        ax.set_title(f"{r['variant']}: real (left) | synthetic (right)\nisolated px {100 * t['isolated_pixel_rate']:.2f} %"
                     f"  fragments {t['fragments']:.2f}  class acc {r['synthetic_class_acc']:.1f}"
                     f"  CAS {r['cas_synthetic']:.1f} (real {r['cas_real']:.1f})", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    real = rows[0]["texture_real"]
    lines = [f"{'variant':<14} {'stage-2 s':>9} {'isolated px %':>13} {'fragments':>9} {'TV':>6} {'class acc':>9} "
             f"{'CAS syn':>8} {'CAS real':>8}",
             f"{'(real test)':<14} {'':>9} {100 * real['isolated_pixel_rate']:13.3f} {real['fragments']:9.3f} "
             f"{real['total_variation']:6.3f}"]
    for r in rows:
        t = r["texture_synthetic"]
        lines.append(f"{r['variant']:<14} {r['stage2_seconds'] or 0:9.0f} {100 * t['isolated_pixel_rate']:13.3f} "
                     f"{t['fragments']:9.3f} {t['total_variation']:6.3f} {r['synthetic_class_acc']:9.2f} "
                     f"{r['cas_synthetic']:8.2f} {r['cas_real']:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist5k.yaml")
    p.add_argument("--run", default="", help="a finished run folder (stage 0/1, pseudo-labels); none: oracle mode")
    p.add_argument("--judge", default="", help="run mode: classifier on all true labels (default: RUN/judge)")
    p.add_argument("--out", default="", help="variants go to OUT/NAME (default: RUN/generators or runs/bench/...)")
    p.add_argument("--results", default="", help="the result JSON and grids (default: benchmarks/results/generator_mnist)")
    p.add_argument("--base", default="baseline", help="oracle mode: the variant whose generator sampling-only "
                   "variants reuse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--variant", action="append", required=True, help="NAME:key=value,key=value (empty: the defaults)")
    p.add_argument("overrides", nargs="*", help="key=value for every variant")
    args = p.parse_args(argv)
    args.judge = args.judge or (str(Path(args.run) / "judge") if args.run else "")
    args.out = args.out or (str(Path(args.run) / "generators") if args.run else str(run_dir(SCRIPT)))
    results = Path(args.results or result_dir(SCRIPT))
    results.mkdir(parents=True, exist_ok=True)
    pixel = None
    if not args.run:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        pixel = PixelJudge(load_config(args.config, [f"seed={args.seed}", *args.overrides]), Path(args.out), args.n,
                           args.seed)
    rows = []
    for spec in args.variant:
        name, _, over = spec.partition(":")
        # commas separate settings, not the items of a list value: a=1,b=[16,32,64]
        rows.append(measure(args, name, [o for o in re.split(r",(?=[\w.]+=)", over) if o], pixel))
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    tag = f"{'oracle' if not args.run else Path(args.run).name}_n{args.n}_seed{args.seed}"
    grids(rows, Path(args.out), results / f"grids_{tag}.png")
    write_result(results / f"generator_{tag}.json", {"rows": rows, "pixel_judge": pixel.info if pixel else None})
    print(f"results: {results}")


if __name__ == "__main__":
    main()
