"""Cached VAE latents for latent-space diffusion training.

Training in a VAE's latent space otherwise encodes every image with the VAE at every step, which
costs more than the denoiser's own step at SD-VAE sizes. Here each training image is encoded once
(plain and, with hflip, mirrored) and the posterior's mean and std are kept, so a training step
still draws a fresh ``z = mean + std * eps`` (the same distribution as encoding at every step) for
the price of a lookup. The cache is rebuilt when the data (paths with their sizes and mtimes, or
the pixels of in-memory sets; the index list), the VAE (config and weight files, or its weights'
hash), the resolution or the stored dtype change.

    latents = load_or_build_latents(run_dir / "latents", source, labels.indices, vae, size, channels,
                                    hflip, batch_size, accelerator)
    z0 = latents.sample(rows, flip, generator)  # (B, C, h, w), already times the scaling factor

On disk, per rank shard: ``latents-<key digest>.r<rank>of<world>.{mean,std}.npy`` (raw .npy
arrays, (n, F, C, h, w), float32 or float16) and a ``.json`` with the key and the shard's rows;
``latents-<key digest>.json`` (written by rank 0 once every shard is complete) lists the shards.
Every rank encodes and writes its own contiguous share; nothing is merged or gathered. Readers
open the shards memory-mapped (``np.load(mmap_mode='r', allow_pickle=False)``), so a training step
reads only the rows of its batch: the memory a rank holds does not grow with the data set (the
operating system's page cache may hold recently read rows, and gives them back when it needs to).
Size on disk: N x F x 2 x C*h*w values (at 256 px with an SD VAE and flips: 64 KiB per image in
float32, 32 KiB in float16).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
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


class LatentSet:
    """Posterior mean and std of every cached image: rows (F, C, h, w), F = 2 with hflip ([plain,
    flipped]) else 1; row k belongs to ``indices[k]`` of the source. The rows live in one or more
    parts (the ranks' shards, memory-mapped .npy arrays, or in-memory arrays) that follow one
    another; ``sample`` reads only the rows it is asked for."""

    def __init__(self, mean, std, indices, scaling_factor: float, path: Path | None = None, device="cpu"):
        means = mean if isinstance(mean, list) else [mean]
        stds = std if isinstance(std, list) else [std]
        self.means = [m.numpy() if isinstance(m, torch.Tensor) else m for m in means]
        self.stds = [v.numpy() if isinstance(v, torch.Tensor) else v for v in stds]
        sizes = [m.shape[0] for m in self.means]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.indices = np.asarray(indices)
        self.scaling_factor = float(scaling_factor)
        self.path = path
        self.device = torch.device(device)
        shapes = {m.shape[1:] for m in self.means if m.shape[0]}
        self.row_shape = next(iter(shapes)) if shapes else (1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def flips(self) -> int:
        return int(self.row_shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Every row's mean in memory (inspection and tests; training reads rows with ``sample``)."""
        return self._all(self.means)

    @property
    def std(self) -> torch.Tensor:
        return self._all(self.stds)

    def _all(self, parts) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.float32) for p in parts if p.shape[0]]))

    def to(self, device) -> LatentSet:
        """The set, drawing its samples on ``device``; the rows stay where they are stored."""
        return LatentSet(self.means, self.stds, self.indices, self.scaling_factor, self.path, device)

    def rows(self, rows: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (float32) of ``rows`` at flip entry ``which``: reads those rows only."""
        rows, which = np.asarray(rows, dtype=np.int64), np.asarray(which, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"latent rows out of range 0..{len(self) - 1}")
        part = np.searchsorted(self.starts, rows, side="right") - 1
        mean = np.empty((len(rows), *self.row_shape[1:]), dtype=np.float32)
        std = np.empty_like(mean)
        for p in np.unique(part).tolist():
            sel = np.flatnonzero(part == p)
            local = rows[sel] - self.starts[p]
            order = np.argsort(local, kind="stable")  # ascending reads from the file
            mean[sel[order]] = self.means[p][local[order], which[sel[order]]]
            std[sel[order]] = self.stds[p][local[order], which[sel[order]]]
        return mean, std

    def sample(
        self, rows: torch.Tensor, flip: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(mean + std * eps) * scaling_factor`` of the given rows, with the mirrored entry where
        ``flip`` is True: what ``Codec.encode`` returns for those images, drawn afresh per call."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu().numpy()
        which = np.zeros_like(rows)
        if flip is not None:
            flip = torch.as_tensor(flip).cpu()
            if self.flips < 2 and bool(flip.any()):
                raise DataError("these latents were cached without hflip; rebuild them with hflip=True")
            which = flip.long().numpy()
        mean, std = self.rows(rows, which)
        mean = torch.from_numpy(mean).to(self.device)
        std = torch.from_numpy(std).to(self.device)
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


def cache_key(source, indices, vae, image_size: int, channels: int, hflip: bool, dtype: str = "float32") -> dict:
    return {
        "format": CACHE_FORMAT,
        "dtype": dtype,
        "image_size": int(image_size),
        "channels": int(channels),
        "hflip": bool(hflip),
        "num_images": int(len(indices)),
        "pixels": PIXELS,
        "data": data_identity(source, indices),
        "vae": vae_identity(vae),
    }


def cache_paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    """(stem of the shard files, index file); the names carry a digest of the key, so caches for
    other sizes or data sit side by side instead of overwriting one another."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(cache_dir) / f"latents-{digest}"
    return stem, stem.with_suffix(".json")


def shard_paths(stem: Path, rank: int, world: int) -> tuple[Path, Path, Path]:
    """(mean .npy, std .npy, shard key .json) of one rank's shard."""
    base = f"{stem.name}.r{rank}of{world}"
    return stem.with_name(base + ".mean.npy"), stem.with_name(base + ".std.npy"), stem.with_name(base + ".json")


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
    source, indices, vae, image_size: int, channels: int, hflip: bool, batch_size: int, show_progress: bool,
    num_workers: int = 0, out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the given images in batches (a progress bar where ``show_progress``). With ``out``
    (two arrays of len(indices) rows, e.g. memory-mapped files) each batch is written into them as
    it is encoded and ``out`` is returned; else the rows are returned as tensors."""
    from tqdm.auto import tqdm

    loader = DataLoader(_Pixels(source, indices, channels, image_size), batch_size=batch_size, num_workers=num_workers)
    means, stds, done = [], [], 0
    with conv_layout(vae), tqdm(total=len(indices), desc="encoding latents", unit="img", disable=not show_progress) as bar:
        for images in loader:
            mean, std = encode_posteriors(vae, images, hflip)
            if out is not None:
                out[0][done : done + len(mean)] = mean.numpy()
                out[1][done : done + len(mean)] = std.numpy()
            else:
                means.append(mean)
                stds.append(std)
            done += len(mean)
            bar.update(images.shape[0])
    if out is not None:
        return out
    if not means:  # a rank with no share
        return torch.empty(0), torch.empty(0)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def _open_rows(path: Path) -> np.ndarray:
    """A shard's rows, memory-mapped read-only; a raw .npy (no pickles are ever read)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _shard_complete(stem: Path, rank: int, world: int, key: dict, count: int) -> bool:
    mean_path, std_path, key_path = shard_paths(stem, rank, world)
    if not (key_path.is_file() and mean_path.is_file() and std_path.is_file()):
        return False
    try:
        stored = json.loads(key_path.read_text())
        if stored.get("key") != json.loads(json.dumps(key)) or stored.get("count") != count:
            return False
        return _open_rows(mean_path).shape[0] == count and _open_rows(std_path).shape[0] == count
    except (OSError, ValueError) as e:
        logger.warning("latent cache shard '%s' unreadable (%s); encoding it again", mean_path, e)
        return False


def write_shard(stem: Path, rank: int, world: int, key: dict, start: int, rows_shape: tuple, encode) -> None:
    """One rank's shard: the .npy files are filled batch by batch under temporary names
    (``encode(out)`` writes into them), flushed and renamed, then the shard's key is written, so a
    key file only ever names complete arrays."""
    mean_path, std_path, key_path = shard_paths(stem, rank, world)
    dtype = np.dtype(key["dtype"])
    with atomic_path(mean_path) as tmp_mean, atomic_path(std_path) as tmp_std:
        mean = np.lib.format.open_memmap(tmp_mean, mode="w+", dtype=dtype, shape=rows_shape)
        std = np.lib.format.open_memmap(tmp_std, mode="w+", dtype=dtype, shape=rows_shape)
        encode((mean, std))
        mean.flush()
        std.flush()
        del mean, std
    atomic_write_json(key_path, {"key": key, "rank": rank, "world": world, "start": start, "count": rows_shape[0],
                                 "mean": mean_path.name, "std": std_path.name})


def write_index(index_path: Path, key: dict, world: int, shares: list[np.ndarray]) -> None:
    stem = index_path.with_suffix("")
    shards = []
    for r, share in enumerate(shares):
        mean_path, std_path, _ = shard_paths(stem, r, world)
        shards.append({"mean": mean_path.name, "std": std_path.name, "start": int(share[0]) if len(share) else 0,
                       "count": len(share)})
    atomic_write_json(index_path, {"key": key, "shards": shards})


def read_cache(index_path: Path, key: dict) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """The shards' (means, stds), memory-mapped, when a complete cache for exactly this key is
    there, else None. Raw .npy arrays and JSON: nothing is unpickled."""
    if not index_path.is_file():
        return None
    try:
        stored = json.loads(index_path.read_text())
        if stored.get("key") != json.loads(json.dumps(key)):
            return None
        means, stds, rows = [], [], 0
        for shard in stored["shards"]:
            mean = _open_rows(index_path.parent / shard["mean"])
            std = _open_rows(index_path.parent / shard["std"])
            if mean.shape != std.shape or mean.shape[0] != shard["count"] or shard["start"] != rows:
                return None
            means.append(mean)
            stds.append(std)
            rows += mean.shape[0]
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("latent cache '%s' unreadable (%s); encoding again", index_path, e)
        return None
    if rows != key["num_images"]:
        return None
    return means, stds


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
    dtype: str = "float32",
) -> LatentSet:
    """The cached latents of ``source[indices]`` at ``image_size`` (plain and mirrored with
    ``hflip``), encoding them first when no valid cache is there. On several processes each rank
    encodes a contiguous share into its own shard (a rank whose complete shard is already there,
    from an interrupted build, keeps it); rank 0 then writes the index, and every rank opens all
    shards memory-mapped. ``vae`` must be on the rank's device already; ``accelerator`` may be None
    for one process. ``dtype``: float32 or float16, the stored values (reads give float32)."""
    if dtype not in ("float32", "float16"):
        raise DataError(f"latent cache dtype must be float32 or float16 (diffusion.latent_dtype), got '{dtype}'")
    cache_dir = Path(cache_dir)
    indices = np.asarray(indices, dtype=np.int64)
    key = cache_key(source, indices, vae, image_size, channels, hflip, dtype)
    stem, index_path = cache_paths(cache_dir, key)
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0

    found = read_cache(index_path, key) if is_main else None
    if _main_decides(accelerator, found is not None):
        if found is None:
            found = read_cache(index_path, key)
        if found is None:
            raise DataError(f"rank {rank} cannot read the latent cache '{index_path}' that rank 0 found")
        logger.info("latents: %d images from cache %s", len(indices), index_path)
        return LatentSet(found[0], found[1], indices, scale, index_path)

    shares = np.array_split(np.arange(len(indices)), world)
    share = shares[rank]
    cache_dir.mkdir(parents=True, exist_ok=True)
    if _shard_complete(stem, rank, world, key, len(share)):
        logger.info("latents: this rank's shard of %d images is complete already", len(share))
    else:
        logger.info("latents: encoding %d images (%d on this rank) into %s", len(indices), len(share), stem)
        row = _row_shape(vae, image_size, channels, hflip)
        write_shard(
            stem, rank, world, key, int(share[0]) if len(share) else 0, (len(share), *row),
            lambda out: encode_share(source, indices[share], vae, image_size, channels, hflip, batch_size, is_main,
                                     num_workers, out),
        )
    if world > 1:
        accelerator.wait_for_everyone()
    if is_main:
        write_index(index_path, key, world, shares)
    if world > 1:
        accelerator.wait_for_everyone()
    found = read_cache(index_path, key)
    if found is None:
        raise DataError(f"rank {rank} cannot read the latent cache '{index_path}' that was just written")
    return LatentSet(found[0], found[1], indices, scale, index_path)


def _row_shape(vae, image_size: int, channels: int, hflip: bool) -> tuple:
    """(F, C, h, w) of one image's posterior, from the VAE's config (AutoencoderKL halves the size
    at every down block but the last)."""
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    side = image_size // factor
    return (2 if hflip else 1, int(cfg.latent_channels), side, side)
