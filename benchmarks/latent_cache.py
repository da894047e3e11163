"""What the latent cache (dpt/diffusion/latents.py) saves in latent-space diffusion training, on the CPU.

1. One training epoch of a small DiT on a generated 64 px RGB set through a small AutoencoderKL,
   encoding every batch with the VAE (train-diffusion's pixel path) against drawing the latents
   from the cache; plus the one-off cost of building the cache. Same data, model, steps and run.
2. The encoder of an AutoencoderKL with Stable Diffusion's architecture (128/256/512/512 channels,
   4 latent channels, random weights) per 256 px image, against a DiT-B/2 training step per image
   on 32 x 32 x 4 latents: the per-image cost the cache removes, next to what remains.

    python -m benchmarks.latent_cache [--threads 1] [--images 128] [--out FILE.json]

The result goes to benchmarks/results/latent_cache/latent_cache.json unless --out names another
file, with its provenance (command, commit, machine).

Ratios are measured on one thread by default, so that other load on the machine and the thread
count move both sides alike.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.record import result_dir, write_result
from dpt.diffusion.codec import Codec
from dpt.diffusion.latents import load_or_build_latents
from dpt.diffusion.model import build_denoiser, denoiser_forward, drop_labels
from dpt.diffusion.sampling import make_noise_scheduler, training_target
from semivit.config.schema import DiffusionConfig
from semivit.data.sources import ArraySource

NUM_CLASSES = 10


def make_vae(block_out_channels: tuple[int, ...], layers_per_block: int, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=min(32, min(block_out_channels)),
    )
    return vae.eval().requires_grad_(False)


def generated_images(n: int, size: int, seed: int = 0) -> ArraySource:
    """Smooth random RGB images (blurred noise, not white noise), one of NUM_CLASSES labels each."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ArraySource(array, np.arange(n) % NUM_CLASSES, [str(c) for c in range(NUM_CLASSES)], prefix="generated")


def diffusion_step(model, opt, noise_scheduler, x0, labels, dcfg: DiffusionConfig, num_classes: int = NUM_CLASSES) -> float:
    """train-diffusion's step from clean latents on: label drop, noise, forward, MSE, backward,
    clip, AdamW."""
    y = drop_labels(labels, num_classes, dcfg.p_uncond)
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],))
    pred = denoiser_forward(model, noise_scheduler.add_noise(x0, noise, t), t, y)
    loss = F.mse_loss(pred.float(), training_target(noise_scheduler, x0, noise, t).float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), dcfg.clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def epoch_encoding_every_step(model, opt, noise_scheduler, codec, pixels, labels, batch, dcfg, seed) -> float:
    """One epoch the way train-diffusion runs it in latent space: every batch is flipped at random
    and encoded by the VAE, then the diffusion step. Returns seconds."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pixels), generator=g)
    start = time.perf_counter()
    for rows in order.split(batch):
        x = pixels[rows].float() / 127.5 - 1.0
        flip = torch.rand(len(rows), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        diffusion_step(model, opt, noise_scheduler, codec.encode(x), labels[rows], dcfg)
    return time.perf_counter() - start


def epoch_from_cache(model, opt, noise_scheduler, latents, labels, batch, dcfg, seed) -> float:
    """The same epoch drawing z = mean + std * eps of the cached plain or mirrored entry."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(latents), generator=g)
    start = time.perf_counter()
    for rows in order.split(batch):
        flip = torch.rand(len(rows), generator=g) < 0.5
        diffusion_step(model, opt, noise_scheduler, latents.sample(rows, flip), labels[rows], dcfg)
    return time.perf_counter() - start


def epoch_comparison(args) -> dict:
    size = 64
    source = generated_images(args.images, size)
    vae = make_vae((32, 64, 128, 128), layers_per_block=1)  # SD's shape, narrower: 64 px -> 8 x 8 x 4
    dcfg = DiffusionConfig(model="dit", patch_size=2, hidden_size=128, depth=4, num_heads=4)
    model = build_denoiser(dcfg, NUM_CLASSES, 4, size // 8)
    start_state = copy.deepcopy(model.state_dict())
    noise_scheduler = make_noise_scheduler(dcfg, latent=True)
    pixels = torch.from_numpy(source.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(source.targets)

    def fresh_optimizer():
        model.load_state_dict(start_state)
        return torch.optim.AdamW(model.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)

    codec = Codec(vae)
    codec.encode(pixels[: args.batch].float() / 127.5 - 1)  # warm-up of both paths' kernels
    encoded = epoch_encoding_every_step(model, fresh_optimizer(), noise_scheduler, codec, pixels, labels, args.batch, dcfg, 0)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        latents = load_or_build_latents(Path(cache_dir), source, np.arange(len(source)), vae, size, 3, True, args.batch, None)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_or_build_latents(Path(cache_dir), source, np.arange(len(source)), vae, size, 3, True, args.batch, None)
        reload = time.perf_counter() - t0
    cached = epoch_from_cache(model, fresh_optimizer(), noise_scheduler, latents, labels, args.batch, dcfg, 0)
    return {
        "images": args.images,
        "image_size": size,
        "batch": args.batch,
        "vae_block_out_channels": [32, 64, 128, 128],
        "dit": {"hidden": dcfg.hidden_size, "depth": dcfg.depth, "patch": dcfg.patch_size, "latent": [4, size // 8, size // 8]},
        "epoch_encoding_s": encoded,
        "epoch_cached_s": cached,
        "speedup": encoded / cached,
        "cache_build_s": build,
        "cache_reload_s": reload,
        "epochs_to_repay_build": build / max(encoded - cached, 1e-9),
    }


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def best_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sd_vae_vs_dit(args) -> dict:
    """Per image: the SD-architecture VAE encoder at 256 px (plain and channels-last input and
    weights) and a DiT-B/2 training step on its 32 x 32 x 4 latents; FLOPs counted as well."""
    vae = make_vae((128, 256, 512, 512), layers_per_block=2)
    x = torch.rand(args.vae_batch, 3, 256, 256) * 2 - 1

    def encode():
        with torch.no_grad():
            return vae.encode(x).latent_dist.mean

    encode()
    vae_flops = flops_of(encode) / args.vae_batch
    vae_s = best_seconds(encode, args.repeats) / args.vae_batch
    vae.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    encode()
    vae_cl_s = best_seconds(encode, args.repeats) / args.vae_batch

    dcfg = DiffusionConfig(model="dit", patch_size=2, hidden_size=768, depth=12, num_heads=12)
    model = build_denoiser(dcfg, 1000, 4, 32)
    noise_scheduler = make_noise_scheduler(dcfg, latent=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(args.dit_batch, 4, 32, 32)
    labels = torch.randint(0, 1000, (args.dit_batch,))

    def step():
        diffusion_step(model, opt, noise_scheduler, x0, labels, dcfg, num_classes=1000)

    step()
    dit_flops = flops_of(step) / args.dit_batch
    dit_s = best_seconds(step, args.repeats) / args.dit_batch
    return {
        "vae_encode_s_per_image": vae_s,
        "vae_encode_channels_last_s_per_image": vae_cl_s,
        "vae_encode_gflop_per_image": vae_flops / 1e9,
        "dit_b2_train_step_s_per_image": dit_s,
        "dit_b2_train_gflop_per_image": dit_flops / 1e9,
        "vae_over_dit_time": min(vae_s, vae_cl_s) / dit_s,
        "vae_over_dit_flops": vae_flops / dit_flops,
        "vae_batch": args.vae_batch,
        "dit_batch": args.dit_batch,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: ratios, not thread counts)")
    p.add_argument("--images", type=int, default=128, help="images in the generated 64 px set")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vae-batch", type=int, default=2)
    p.add_argument("--dit-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of part 2 (best is kept)")
    p.add_argument("--skip-sd", action="store_true", help="only part 1")
    p.add_argument("--out", default="", help="JSON file (default: benchmarks/results/latent_cache/latent_cache.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "epoch": epoch_comparison(args)}
    e = result["epoch"]
    print(f"part 1: one epoch, {e['images']} images at {e['image_size']} px, batch {e['batch']}, {result['threads']} thread(s)")
    print(f"  encode every step : {e['epoch_encoding_s']:8.2f} s")
    print(f"  from the cache    : {e['epoch_cached_s']:8.2f} s   speed-up x{e['speedup']:.1f}")
    print(f"  building the cache: {e['cache_build_s']:8.2f} s once (both flips; reloading it {e['cache_reload_s']:.2f} s)")
    if not args.skip_sd:
        result["sd_vae_vs_dit_b2"] = s = sd_vae_vs_dit(args)
        print("part 2: per image, SD-architecture VAE encoder at 256 px vs DiT-B/2 training step on 32x32x4")
        print(f"  VAE encode        : {s['vae_encode_s_per_image']:8.3f} s ({s['vae_encode_gflop_per_image']:.0f} GFLOP)"
              f", channels-last {s['vae_encode_channels_last_s_per_image']:.3f} s")
        print(f"  DiT-B/2 train step: {s['dit_b2_train_step_s_per_image']:8.3f} s ({s['dit_b2_train_gflop_per_image']:.0f} GFLOP)")
        print(f"  VAE / DiT         : x{s['vae_over_dit_time']:.2f} in time, x{s['vae_over_dit_flops']:.2f} in FLOPs")
    out = write_result(Path(args.out) if args.out else result_dir(__name__) / "latent_cache.json", result,
                       argv=None if argv is None else [__file__, *argv])
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
