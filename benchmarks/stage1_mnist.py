"""Stage-1 benchmark on MNIST-5k (4000 train / 1000 test), 10 labels per class.

  (a) supervised from scratch on the 100 labeled images
  (b) MAE (stage 0) + supervised fine-tuning               = the run's stage1/finetune
  (c) MAE + fine-tuning + Semi-ViT (EMA-Teacher)           = the run's stage1/semi
  (d) as (c) with the student as its own teacher (FixMatch)
  (e) supervised on all 4000 labels (ceiling), MAE init
plus two speed ratios measured in this process: batched vs per-sample pseudo mixup at 320 images,
and one semi step vs one supervised step over the same number of images.

Top-1 is the final EMA model's on the 1000 test images (never a best epoch). A run directory made
by the pipeline can be reused: ``--run runs/mnist5k`` takes its stage0, stage1/finetune and
stage1/semi when present and trains only what is missing.

  nice python -m benchmarks.stage1_mnist --run runs/mnist5k

Runs go to --run (default runs/bench/stage1_mnist/); the table to
benchmarks/results/stage1_mnist/RESULTS_stage1_seedS.md and the numbers to stage1_seedS.json
there with their provenance (command, commit, machine); --out names another folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.record import ROOT, provenance, result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.files import atomic_write_text, read_json
from semivit.runtime.layout import METRICS, RunLayout


def stage(path: Path, make) -> dict:
    """metrics.json of a finished stage folder, training it first when it is missing."""
    if not (path / METRICS).is_file():
        make()
    return read_json(path / METRICS)


def accuracy_rows(args) -> list[dict]:
    from semivit.stages.finetune import run_finetune
    from semivit.stages.pretrain import run_pretrain
    from semivit.stages.semi import run_semi

    run = Path(args.run)
    paths = RunLayout(run)
    base = [f"output_dir={run}", f"seed={args.seed}", *args.overrides]
    cfg = lambda *o: load_config(ROOT / "configs" / "mnist5k.yaml", [*base, *o])  # noqa: E731
    bench = run / "bench_stage1"
    rows = []
    if "a" in args.which:  # needs no stage 0
        m = stage(bench / "a_scratch", lambda: run_finetune(cfg(), out_dir=bench / "a_scratch", init="none"))
        rows.append(("a", "supervised from scratch (100 labels)", m, m["seconds"]))
    if not set(args.which) & set("bcde"):
        return _table(rows)
    s0 = stage(paths.stage0, lambda: run_pretrain(cfg()))
    if "e" in args.which and (paths.judge / METRICS).is_file():  # the pipeline's ceiling model
        m = read_json(paths.judge / METRICS)
        rows.append(("e", f"supervised, all 4000 labels, MAE init (pipeline judge, {m.get('epochs')} epochs)", m,
                     s0["seconds"] + m["seconds"]))
    elif "e" in args.which:  # needs stage 0 only
        e_cfg = cfg("data.label_percent=100", f"finetune.epochs={args.ceiling_epochs}", "finetune.batch_size=64")
        m = stage(bench / "e_all_labels", lambda: run_finetune(e_cfg, out_dir=bench / "e_all_labels", use_run_split=False))
        rows.append(("e", f"supervised, all 4000 labels, MAE init ({args.ceiling_epochs} epochs)", m, s0["seconds"] + m["seconds"]))
    if not set(args.which) & set("bcd"):
        return _table(rows)
    ft = stage(paths.finetune, lambda: run_finetune(cfg()))
    if "b" in args.which:
        rows.append(("b", "MAE + supervised fine-tuning", ft, s0["seconds"] + ft["seconds"]))
    if "c" in args.which:
        m = stage(paths.semi, lambda: run_semi(cfg()))
        rows.append(("c", "MAE + fine-tuning + Semi-ViT (EMA-Teacher)", m, s0["seconds"] + ft["seconds"] + m["seconds"]))
    if "d" in args.which:
        m = stage(bench / "d_fixmatch", lambda: run_semi(cfg("semi.teacher=student"), out_dir=bench / "d_fixmatch"))
        rows.append(("d", "as (c), FixMatch mode (teacher = student)", m, s0["seconds"] + ft["seconds"] + m["seconds"]))
    return _table(sorted(rows, key=lambda r: r[0]))


def _table(rows) -> list[dict]:
    return [
        {"id": i, "setting": name, "top1_ema": m["top1_ema"], "top1": m["top1"], "num_labeled": m["num_labeled"],
         "pseudo_label_acc": m.get("pseudo_label_acc"), "mask_ratio": m.get("mask_ratio"), "seconds": round(sec, 1)}
        for i, name, m, sec in rows
    ]


def _mixup_per_sample(x, conf, hard, k, tau, smoothing=0.1):
    """The reference's shape of the computation: a Python loop over samples, one box at a time."""
    import numpy as np

    n, _, h, w = x.shape
    perm = torch.randperm(n)
    out, targets, masks = torch.empty_like(x), torch.empty(n, k), torch.empty(n, dtype=torch.bool)
    eye = torch.full((k, k), smoothing / k) + torch.eye(k) * (1 - smoothing)
    for i in range(n):
        j = int(perm[i])
        lam = float(conf[i] / (conf[i] + conf[j]))
        if np.random.rand() < 0.5:
            r = np.sqrt(1 - lam)
            ch, cw = int(h * r), int(w * r)
            cy, cx = np.random.randint(h), np.random.randint(w)
            y1, y2 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
            x1, x2 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
            img = x[i].clone()
            img[:, y1:y2, x1:x2] = x[j, :, y1:y2, x1:x2]
            lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)
        else:
            img = lam * x[i] + (1 - lam) * x[j]
        out[i] = img
        targets[i] = lam * eye[hard[i]] + (1 - lam) * eye[hard[j]]
        masks[i] = max(float(conf[i]), float(conf[j])) >= tau
    return out, targets, masks


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def speed_rows(args) -> dict:
    from semivit.data.sources import build_data
    from semivit.stages.common import build_classifier, make_ema, make_optimizer
    from semivit.stages.semi import train_step
    from semivit.stages.ssl import prob_pseudo_mixup

    torch.manual_seed(0)
    n, k = 320, 10
    x = torch.randn(n, 1, 28, 28)
    conf, hard = torch.rand(n) * 0.5 + 0.5, torch.randint(0, k, (n,))
    t_vec = _best_of(lambda: prob_pseudo_mixup(x, conf, hard, k, 0.7), 20)
    t_loop = _best_of(lambda: _mixup_per_sample(x, conf, hard, k, 0.7), 5)

    cfg = load_config(ROOT / "configs" / "mnist5k.yaml", list(args.overrides))
    bundle = build_data(cfg.data)
    model = build_classifier(cfg, bundle, None)
    ema = make_ema(model, cfg.semi.ema_decay)
    opt = make_optimizer(model, cfg.semi.lr, cfg.semi.weight_decay, cfg.semi.layer_decay)
    B, mu = cfg.semi.batch_size, cfg.semi.mu
    x_l, y_l = torch.randn(B, 1, 28, 28), torch.randint(0, k, (B,))
    weak, strong = torch.randn(mu * B, 1, 28, 28), torch.randn(mu * B, 1, 28, 28)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    class _Acc:  # the bits of an Accelerator that train_step uses, on one CPU process
        autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
        unwrap_model = staticmethod(lambda m: m)

    def semi_step():
        losses, _, _ = train_step(model, ema, _Acc, crit, None, cfg.semi, k, x_l, y_l, weak, strong)
        losses[0].backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)

    x_all, y_all = torch.cat([x_l, strong]), torch.randint(0, k, ((mu + 1) * B,))

    def sup_step():
        crit(model(x_all), y_all).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)

    model.train()
    semi_step(), sup_step()  # warm-up
    t_semi, t_sup = _best_of(semi_step, 8), _best_of(sup_step, 8)
    return {
        "pseudo_mixup_batched_ms": 1000 * t_vec,
        "pseudo_mixup_loop_ms": 1000 * t_loop,
        "pseudo_mixup_speedup": t_loop / t_vec,
        "images_per_step": (mu + 1) * B,
        "semi_step_ms": 1000 * t_semi,
        "supervised_step_ms": 1000 * t_sup,
        "semi_over_supervised": t_semi / t_sup,
    }


def write_markdown(path: Path, rows, speed, args, wall) -> None:
    lines = [
        "# Stage 1 (Semi-ViT) on MNIST-5k",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads. Shared with other jobs while measured.",
        "",
        f"Command: `{provenance(args.argv)['command']}`  (total wall {wall / 60:.1f} min)",
        "",
        "Protocol: MNIST-5k fixed split 4000 train / 1000 test, 10 labels per class (100 labeled), seed "
        f"{args.seed}; top-1 of the final EMA model on the 1000 test images (no best-epoch selection). "
        "Wall time includes stage 0 (MAE) for the rows that use it.",
        "",
        "| | setting | top-1 EMA | top-1 student | labeled | pseudo-label acc | mask ratio | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| ({r['id']}) | {r['setting']} | **{r['top1_ema']:.2f}** | {r['top1']:.2f} | {r['num_labeled']} | "
            f"{fmt(r['pseudo_label_acc'])} | {fmt(r['mask_ratio'])} | {r['seconds']:.0f} |"
        )
    if speed:
        lines += [
            "",
            "## Speed (one process, measured in the same run; best of several repeats)",
            "",
            f"- Probabilistic pseudo mixup on 320 images 1x28x28: batched {speed['pseudo_mixup_batched_ms']:.2f} ms, "
            f"per-sample Python loop {speed['pseudo_mixup_loop_ms']:.2f} ms -> **{speed['pseudo_mixup_speedup']:.0f}x**.",
            f"- One semi step vs one supervised step over the same {speed['images_per_step']} images: "
            f"{speed['semi_step_ms']:.0f} ms vs {speed['supervised_step_ms']:.0f} ms -> "
            f"**{speed['semi_over_supervised']:.2f}x** (the extra cost is the teacher's forward pass on the weak views).",
        ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(run_dir(__name__)), help="run directory; existing stages are reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--which", default="abcde", help="which rows to produce")
    p.add_argument("--ceiling-epochs", type=int, default=15)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", default=str(result_dir(__name__)), help="folder of the table and the JSON")
    p.add_argument("overrides", nargs="*", help="settings key=value for every run")
    args = p.parse_args(argv)
    args.argv = list(sys.argv) if argv is None else [__file__, *argv]
    t = time.time()
    speed = None if args.no_speed else speed_rows(args)
    rows = accuracy_rows(args)
    wall = time.time() - t
    out = Path(args.out) / f"RESULTS_stage1_seed{args.seed}.md"
    write_markdown(out, rows, speed, args, wall)
    write_result(Path(args.out) / f"stage1_seed{args.seed}.json", {"rows": rows, "speed": speed}, argv=args.argv)
    print(out.read_text())


if __name__ == "__main__":
    main()
