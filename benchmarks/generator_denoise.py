"""Where do a generator's speckles come from? Two cheap probes of a trained pixel generator.

1. One-step denoising of real digits: real test digits noised to timestep t (fixed noise), the
   network's clean-image estimate (conditional on the true class, and guided with w), clipped to
   [-1, 1], measured with dpt.quality's texture measures and its MSE to the clean digit. If the
   estimate of a *real* noisy digit is already speckled at small t, the network cannot denoise
   the nearly clean levels (a training problem); if it is clean there, the speckles come from the
   sampling path.
2. The sampling path: the clipped clean-image estimate at every step of the configured sampler
   (texture measured at each step), for N images per class.

    python -m benchmarks.generator_denoise --model runs/bench/generator_mnist/baseline/stage2/model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import result_dir, write_result


def load(model_dir: str):
    from dpt.diffusion.model import load_generator

    model, sched, meta = load_generator(model_dir)
    return model, sched, meta


def u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


@torch.no_grad()
def one_step(model, sched_cfg, meta, images: np.ndarray, labels: np.ndarray, ts: list[int], w: float) -> list[dict]:
    from diffusers import DDPMScheduler

    from dpt.diffusion.sampling import predict
    from dpt.quality import texture_measures

    sched = DDPMScheduler.from_config(sched_cfg)
    x0 = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.as_tensor(labels)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in ts:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        xt = sched.add_noise(x0, noise, tt)
        out = torch.cat([predict(model, b, tt[: len(b)], yb, meta["null_label"], w) for b, yb in
                         zip(xt.split(250), y.split(250), strict=True)])
        ab = sched.alphas_cumprod[t]
        kind = sched.config.prediction_type
        if kind == "epsilon":
            est = (xt - (1 - ab).sqrt() * out) / ab.sqrt()
        elif kind == "v_prediction":
            est = ab.sqrt() * xt - (1 - ab).sqrt() * out
        else:
            est = out
        est = est.clamp(-1, 1)
        rows.append({"t": t, "sigma": float((1 - ab).sqrt()), "w": w, "mse": float((est - x0).pow(2).mean()),
                     "estimate": texture_measures(u8(est)), "noisy_input": texture_measures(u8(xt))})
    return rows


@torch.no_grad()
def path(model, sched_cfg, meta, sampler: str, steps: int, w: float, per_class: int) -> list[dict]:
    from dpt.diffusion.sampling import image_noise, image_seed, make_sampler, predict
    from dpt.quality import texture_measures

    k = len(meta["classes"])
    labels = torch.tensor([c for c in range(k) for _ in range(per_class)])
    seeds = [image_seed(0, c, i) for c in range(k) for i in range(per_class)]
    x, gens = image_noise(seeds, (meta["model_channels"], meta["model_size"], meta["model_size"]))
    sch = make_sampler(sched_cfg, sampler)
    sch.set_timesteps(steps)
    x = x * sch.init_noise_sigma
    rows = []
    for t in sch.timesteps:
        out = predict(model, sch.scale_model_input(x, t), t, labels, meta["null_label"], w)
        res = sch.step(out, t, x, generator=gens)
        est = getattr(res, "pred_original_sample", None)
        if est is None:  # DPM-Solver++ keeps its (thresholded) clean-image estimate in model_outputs
            est = sch.model_outputs[-1]
        x = res.prev_sample
        rows.append({"t": int(t), "estimate": texture_measures(u8(est)), "x_t": texture_measures(u8(x))})
    rows.append({"t": "final", "estimate": texture_measures(u8(x))})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a stage2/model folder")
    p.add_argument("--config", default="configs/mnist5k.yaml")
    p.add_argument("--images", type=int, default=500, help="real test digits for the one-step probe")
    p.add_argument("--per-class", type=int, default=20, help="images per class for the sampling path")
    p.add_argument("--t", default="10,20,40,80,160,320,500")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="", help="result JSON (default: benchmarks/results/generator_mnist/denoise_<name>.json)")
    p.add_argument("--name", default="baseline")
    args = p.parse_args(argv)
    from dpt.quality import load_images
    from semivit.config.load import load_config
    from semivit.data.sources import build_data

    torch.manual_seed(0)
    model, sched_cfg, meta = load(args.model)
    test = build_data(load_config(args.config, []).data).test
    imgs, labels = load_images(test, range(min(args.images, len(test))), size=meta["model_size"])
    ts = [int(t) for t in args.t.split(",") if t]  # empty: the sampling path only
    c0 = time.process_time()
    result = {"model": args.model,
              "one_step_conditional": one_step(model, sched_cfg, meta, imgs, labels, ts, 1.0),
              "one_step_guided": one_step(model, sched_cfg, meta, imgs, labels, ts, args.guidance),
              "path": path(model, sched_cfg, meta, args.sampler, args.steps, args.guidance, args.per_class)
              if args.per_class > 0 else [],
              "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    result["cpu_seconds"] = time.process_time() - c0
    print(f"{'t':>5} {'sigma':>6} {'w':>4} {'mse':>7} {'iso% est':>9} {'frag est':>8} {'seams est':>9} {'iso% x_t':>9}")
    for r in result["one_step_conditional"] + result["one_step_guided"]:
        print(f"{r['t']:>5} {r['sigma']:6.3f} {r['w']:4.1f} {r['mse']:7.4f} {100 * r['estimate']['isolated_pixel_rate']:9.3f}"
              f" {r['estimate']['fragments']:8.2f} {r['estimate']['grid_edge_ratio']:9.2f}"
              f" {100 * r['noisy_input']['isolated_pixel_rate']:9.3f}")
    print("sampling path (clipped clean-image estimate per step):")
    for r in result["path"]:
        e = r["estimate"]
        print(f"  t={r['t']!s:>5}  isolated {100 * e['isolated_pixel_rate']:6.3f} %  fragments {e['fragments']:5.2f}"
              f"  TV {e['total_variation']:.3f}  seams {e['grid_edge_ratio']:.2f}")
    out = Path(args.out) if args.out else result_dir("benchmarks.generator_mnist") / f"denoise_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
