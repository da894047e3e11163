"""Cached VAE latents for latent-space diffusion training.

Training in a VAE's latent space otherwise encodes every image with the VAE at every step, which
costs more than the denoiser's own step at SD-VAE sizes. Here each training image is encoded once
(plain and, with hflip, mirrored) and the posterior's mean and std are kept, so a training step
still draws a fresh ``z = mean + std * eps`` (the same distribution as encoding at every step) for
the price of a lookup. The cache is one safetensors file plus a JSON key, shared by later epochs,
resumed runs and every rank; it is rebuilt when the data (paths with their sizes and mtimes, or the
pixels of in-memory sets; the index list), the VAE (config and weight files, or its weights' hash)
or the resolution change.

    latents = load_or_build_latents(run_dir / "latents", source, labels.indices, vae, size, channels,
                                    hflip, batch_size, accelerator)
    z0 = latents.sample(rows, flip, generator)  # (B, C, h, w), already times the scaling factor

Memory: N x F x 2 x C*h*w float32 values (at 256 px with an SD VAE, 64 KiB per image with flips).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from semivit.data.sources import ArraySource, ImageSource
from semivit.errors import DataError
from semivit.files import atomic_path, atomic_write_json

logger = logging.getLogger("dpt")

CACHE_FORMAT = 1  # bump when what is stored, or how images are read, changes
PIXELS = "convert(L|RGB), Resize(size, antialias), CenterCrop(size), PILToTensor, x / 127.5 - 1"


@dataclass
class LatentSet:
    """Posterior mean and std of every cached image: (N, F, C, h, w), F = 2 with hflip ([plain,
    flipped]) else 1; row k belongs to ``indices[k]`` of the source."""

    mean: torch.Tensor
    std: torch.Tensor
    indices: np.ndarray
    scaling_factor: float
    path: Path | None = None

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def flips(self) -> int:
        return self.mean.shape[1]

    def to(self, device) -> LatentSet:
        """The set on ``device`` (e.g. the GPU, where drawing and indexing are cheapest)."""
        return LatentSet(self.mean.to(device), self.std.to(device), self.indices, self.scaling_factor, self.path)

    def sample(
        self, rows: torch.Tensor, flip: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(mean + std * eps) * scaling_factor`` of the given rows, with the mirrored entry where
        ``flip`` is True: what ``Codec.encode`` returns for those images, drawn afresh per call."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mean.device)
        which = torch.zeros_like(rows)
        if flip is not None:
            if self.flips < 2 and bool(torch.as_tensor(flip).any()):
                raise DataError("these latents were cached without hflip; rebuild them with hflip=True")
            which = torch.as_tensor(flip, device=rows.device).long()
        mean, std = self.mean[rows, which], self.std[rows, which]
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps) * self.scaling_factor


# --------------------------------------------------------------------------------------------
# The cache key
# --------------------------------------------------------------------------------------------


def data_identity(source: ImageSource, indices: np.ndarray) -> str:
    """A hash of the index list and of each image's path with its file size and mtime; in-memory
    images (no file behind the path) are hashed by their pixels."""
    h = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes())
    arrays = source.images if isinstance(source, ArraySource) else None
    for i in np.asarray(indices).tolist():
        path = source.paths[i]
        h.update(path.encode() + b"\0")
        if arrays is not None:
            h.update(np.ascontiguousarray(arrays[i]).tobytes())
        elif os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(np.asarray(source.load(i)).tobytes())
    return h.hexdigest()


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def vae_identity(vae) -> dict:
    """The VAE's config plus the size and mtime of the weight files it was loaded from, or a hash
    of its weights when it was not loaded from a folder (e.g. built in memory)."""
    # the private entries hold the load path, the library version and a set of defaulted names
    # (listed in a per-process order): none of them changes what the encoder computes
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config["class"] = type(vae).__name__
    folder = Path(str(getattr(vae.config, "_name_or_path", "") or ""))
    files = []
    if str(folder) not in ("", ".") and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if files:
        weights = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    else:
        weights = _weights_hash(vae)
    return {"config": json.loads(json.dumps(config, default=str)), "weights": weights, "dtype": str(vae.dtype)}


def cache_key(source, indices, vae, image_size: int, channels: int, hflip: bool) -> dict:
    return {
        "format": CACHE_FORMAT,
        "image_size": int(image_size),
        "channels": int(channels),
        "hflip": bool(hflip),
        "num_images": int(len(indices)),
        "pixels": PIXELS,
        "data": data_identity(source, indices),
        "vae": vae_identity(vae),
    }


def cache_paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    """(tensors, key file); the name carries a digest of the key, so caches for other sizes or
    data sit side by side instead of overwriting one another."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(cache_dir) / f"latents-{digest}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


class _Pixels(Dataset):
    """uint8 images read exactly as train-diffusion's pixel path reads them."""

    def __init__(self, source: ImageSource, indices: np.ndarray, channels: int, size: int):
        self.source, self.indices = source, np.asarray(indices)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.transform(self.source.load(int(self.indices[k])).convert(self.mode))


@contextlib.contextmanager
def conv_layout(vae):
    """On CUDA, the VAE's weights in channels-last while it encodes (cuDNN's fast layout for
    convolutions, which the encoder is made of), restored afterwards. On the CPU the plain layout
    stays: channels-last measured slower there (benchmarks/latent_cache.py)."""
    cuda = next(vae.parameters()).device.type == "cuda"
    if cuda:
        vae.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if cuda:
            vae.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (B, F, C, h, w) of uint8 images; the mirrored images go through the
    same encoder call as the plain ones."""
    x = images.float() / 127.5 - 1.0
    if hflip:
        x = torch.cat([x, x.flip(-1)])
    param = next(vae.parameters())
    x = x.to(param.device, param.dtype)
    if param.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # with the weights, see conv_layout
    dist = vae.encode(x).latent_dist
    flips = 2 if hflip else 1
    shape = (flips, images.shape[0], *dist.mean.shape[1:])
    mean = dist.mean.float().reshape(shape).transpose(0, 1)
    std = dist.std.float().reshape(shape).transpose(0, 1)
    return mean.cpu().contiguous(), std.cpu().contiguous()


def encode_share(
    source, indices, vae, image_size: int, channels: int, hflip: bool, batch_size: int, show_progress: bool, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the given images in batches (a progress bar where ``show_progress``)."""
    from tqdm.auto import tqdm

    loader = DataLoader(_Pixels(source, indices, channels, image_size), batch_size=batch_size, num_workers=num_workers)
    means, stds = [], []
    with conv_layout(vae), tqdm(total=len(indices), desc="encoding latents", unit="img", disable=not show_progress) as bar:
        for images in loader:
            mean, std = encode_posteriors(vae, images, hflip)
            means.append(mean)
            stds.append(std)
            bar.update(images.shape[0])
    if not means:  # a rank with no share
        return torch.empty(0), torch.empty(0)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def write_cache(tensors_path: Path, key_path: Path, key: dict, mean, std, indices) -> None:
    """Tensors first, then the key: a key file only ever names a complete tensor file. Both are
    written under temporary names and renamed into place."""
    from safetensors.torch import save_file

    tensors = {"mean": mean, "std": std, "indices": torch.as_tensor(np.asarray(indices, dtype=np.int64))}
    with atomic_path(tensors_path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": str(CACHE_FORMAT)})
    atomic_write_json(key_path, {"key": key, "tensors": tensors_path.name})


def read_cache(tensors_path: Path, key_path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) when a complete cache for exactly this key is there, else None. Plain
    safetensors and JSON: nothing is unpickled."""
    from safetensors.torch import load_file

    if not (key_path.is_file() and tensors_path.is_file()):
        return None
    try:
        stored = json.loads(key_path.read_text())
        if stored.get("key") != json.loads(json.dumps(key)):
            return None
        tensors = load_file(str(tensors_path))
    except (OSError, ValueError) as e:
        logger.warning("latent cache '%s' unreadable (%s); encoding again", tensors_path, e)
        return None
    if tensors["mean"].shape[0] != key["num_images"] or tensors["std"].shape != tensors["mean"].shape:
        return None
    return tensors["mean"], tensors["std"]


def _part_path(tensors_path: Path, rank: int, world: int) -> Path:
    return tensors_path.with_name(f".{tensors_path.stem}.part{rank}-of-{world}.safetensors")


def _save_part(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp))


def _merge_parts(tensors_path: Path, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks' shares, in rank order (each rank took one contiguous slice of the rows)."""
    from safetensors.torch import load_file

    parts = [load_file(str(_part_path(tensors_path, r, world))) for r in range(world)]
    parts = [p for p in parts if p["mean"].numel()]
    return torch.cat([p["mean"] for p in parts]), torch.cat([p["std"] for p in parts])


def _main_decides(accelerator, value):
    """Rank 0's value on every rank, so that all ranks take the same branch (and meet at the same
    barriers) even if a shared file system shows them the cache at slightly different times."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def load_or_build_latents(
    cache_dir: Path,
    source: ImageSource,
    indices: np.ndarray,
    vae,
    image_size: int,
    channels: int,
    hflip: bool,
    batch_size: int,
    accelerator=None,
    num_workers: int = 0,
) -> LatentSet:
    """The cached latents of ``source[indices]`` at ``image_size`` (plain and mirrored with
    ``hflip``), encoding them first when no valid cache is there. On several processes each rank
    encodes a contiguous share, rank 0 merges the shares and writes the cache, and every rank
    reads it back. ``vae`` must be on the rank's device already; ``accelerator`` may be None for
    one process."""
    cache_dir = Path(cache_dir)
    indices = np.asarray(indices, dtype=np.int64)
    key = cache_key(source, indices, vae, image_size, channels, hflip)
    tensors_path, key_path = cache_paths(cache_dir, key)
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0

    found = read_cache(tensors_path, key_path, key) if is_main else None
    if _main_decides(accelerator, found is not None):
        if found is None:
            found = read_cache(tensors_path, key_path, key)
        if found is None:
            raise DataError(f"rank {rank} cannot read the latent cache '{tensors_path}' that rank 0 found")
        logger.info("latents: %d images from cache %s", len(indices), tensors_path)
        return LatentSet(found[0], found[1], indices, scale, tensors_path)

    share = np.array_split(np.arange(len(indices)), world)[rank]
    logger.info("latents: encoding %d images (%d on this rank) into %s", len(indices), len(share), tensors_path)
    mean, std = encode_share(source, indices[share], vae, image_size, channels, hflip, batch_size, is_main, num_workers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        _save_part(_part_path(tensors_path, rank, world), mean, std)
        accelerator.wait_for_everyone()
        if is_main:
            mean, std = _merge_parts(tensors_path, world)
    if is_main:
        write_cache(tensors_path, key_path, key, mean, std, indices)
        for r in range(world if world > 1 else 0):
            _part_path(tensors_path, r, world).unlink(missing_ok=True)
    if world > 1:
        accelerator.wait_for_everyone()
        if not is_main:
            found = read_cache(tensors_path, key_path, key)
            if found is None:
                raise DataError(f"rank {rank} cannot read the latent cache '{tensors_path}' rank 0 wrote")
            mean, std = found
    return LatentSet(mean, std, indices, scale, tensors_path)
