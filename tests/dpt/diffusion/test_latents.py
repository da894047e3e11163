"""dpt.latents: VAE latents encoded once, cached, reused, and rebuilt when data, VAE or size change.

Also run as a script under ``accelerate launch`` (two CPU ranks) by the distributed test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from dpt.diffusion.latents import LatentSet, load_or_build_latents  # noqa: E402
from semivit.data.sources import ArraySource, FileSource  # noqa: E402

SIZE = 16  # pixels; the tiny VAE halves it once: 8 x 8 latents


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=SIZE,
    )
    return vae.eval().requires_grad_(False)


def write_images(folder: Path, n: int = 7, seed: int = 0) -> FileSource:
    """Random RGB PNGs of a few odd sizes, so resize and centre crop both do something."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 18 + i % 3, 20 + 2 * (i % 2)
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return FileSource(paths, [i % 2 for i in range(n)], ["a", "b"], mode="RGB")


def count_encodes(vae) -> list:
    """Wrap ``vae.encode`` so that every call is counted (the list grows by the batch size)."""
    calls, encode = [], vae.encode

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return encode(x, *args, **kwargs)

    vae.encode = counted
    return calls


def pixels(source, i: int, size: int = SIZE) -> torch.Tensor:
    """One image read as train-diffusion's pixel path reads it, in [-1, 1]."""
    tf = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor()])
    return tf(source.load(i).convert("RGB")).float() / 127.5 - 1


def build(cache, source, vae, indices=None, size=SIZE, hflip=True, batch=3):
    idx = np.arange(len(source)) if indices is None else np.asarray(indices)
    return load_or_build_latents(cache, source, idx, vae, size, 3, hflip, batch, None)


def test_built_once_then_reused(tmp_path):
    source = write_images(tmp_path / "data")
    vae = tiny_vae()
    calls = count_encodes(vae)
    first = build(tmp_path / "cache", source, vae)
    assert sum(calls) == 2 * 7 and len(calls) == 3  # 3 batches, plain + mirrored in each call
    assert first.mean.shape == first.std.shape == (7, 2, 4, 8, 8) and first.flips == 2
    again = build(tmp_path / "cache", source, vae)
    assert sum(calls) == 14  # no second encode
    assert torch.equal(again.mean, first.mean) and torch.equal(again.std, first.std)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    stem = first.path.stem
    assert names == sorted([f"{stem}.json", f"{stem}.r0of1.json", f"{stem}.r0of1.mean.npy", f"{stem}.r0of1.std.npy"])


def test_mean_std_equal_direct_encode_and_flip(tmp_path):
    source = write_images(tmp_path / "data")
    vae = tiny_vae()
    latents = build(tmp_path / "cache", source, vae, indices=[4, 1, 6])
    x = torch.stack([pixels(source, i) for i in (4, 1, 6)])
    with torch.no_grad():
        plain = vae.encode(x).latent_dist
        mirrored = vae.encode(x.flip(-1)).latent_dist
    assert torch.allclose(latents.mean[:, 0], plain.mean, atol=1e-5)
    assert torch.allclose(latents.std[:, 0], plain.std, atol=1e-5)
    assert torch.allclose(latents.mean[:, 1], mirrored.mean, atol=1e-5)
    assert torch.allclose(latents.std[:, 1], mirrored.std, atol=1e-5)
    assert latents.indices.tolist() == [4, 1, 6]


def test_rebuilt_when_size_vae_data_or_indices_change(tmp_path):
    source = write_images(tmp_path / "data")
    vae = tiny_vae()
    calls = count_encodes(vae)
    cache = tmp_path / "cache"
    build(cache, source, vae)
    n = len(calls)
    assert build(cache, source, vae, size=8).mean.shape[-1] == 4  # another resolution
    assert len(calls) > n
    n = len(calls)
    build(cache, source, vae, indices=[0, 2, 3])  # another index list
    assert len(calls) > n
    other = tiny_vae(seed=1)  # same config, other weights
    other_calls = count_encodes(other)
    build(cache, source, other)
    assert other_calls
    n = len(calls)
    write_images(tmp_path / "data", seed=5)  # the files are rewritten: new sizes / mtimes
    build(cache, source, vae)
    assert len(calls) > n
    n = len(calls)
    build(cache, source, vae)  # and that new state is cached in turn
    assert len(calls) == n


def test_vae_folder_identity_and_in_memory_data(tmp_path):
    from dpt.diffusion.codec import load_vae

    tiny_vae(seed=0).save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    calls = count_encodes(vae)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    source = ArraySource(images, [0] * 5, ["a"], prefix="mem")
    build(tmp_path / "cache", source, vae, hflip=False)
    n = len(calls)
    build(tmp_path / "cache", source, vae, hflip=False)
    assert len(calls) == n  # same folder, same files
    images[2, 0, 0] ^= 1  # one pixel of an in-memory image
    build(tmp_path / "cache", ArraySource(images, [0] * 5, ["a"], prefix="mem"), vae, hflip=False)
    assert len(calls) > n
    tiny_vae(seed=2).save_pretrained(tmp_path / "vae")  # new weights in the same folder
    vae2 = load_vae(str(tmp_path / "vae"))
    calls2 = count_encodes(vae2)
    build(tmp_path / "cache", source, vae2, hflip=False)
    assert calls2


def test_cache_is_raw_npy_memory_mapped_and_json(tmp_path):
    source = write_images(tmp_path / "data")
    latents = build(tmp_path / "cache", source, tiny_vae())
    index = json.loads(latents.path.read_text())
    assert index["key"]["image_size"] == SIZE and index["key"]["hflip"] is True and index["key"]["num_images"] == 7
    assert index["key"]["dtype"] == "float32" and [s["count"] for s in index["shards"]] == [7]
    mean = np.load(latents.path.parent / index["shards"][0]["mean"], allow_pickle=False)
    assert mean.dtype == np.float32 and torch.equal(torch.from_numpy(mean), latents.mean)
    assert all(isinstance(m, np.memmap) for m in latents.means + latents.stds)  # opened memory-mapped, not read


def test_float16_cache_is_half_the_size_and_close(tmp_path):
    source = write_images(tmp_path / "data")
    vae = tiny_vae()
    full = build(tmp_path / "cache", source, vae)
    calls = count_encodes(vae)
    half = load_or_build_latents(tmp_path / "cache", source, np.arange(7), vae, SIZE, 3, True, 3, None, dtype="float16")
    assert calls  # another dtype is another cache
    assert half.means[0].dtype == np.float16 and half.path != full.path
    assert torch.allclose(half.mean, full.mean, atol=2e-3, rtol=2e-3)
    assert half.sample(torch.tensor([0, 6]), torch.tensor([False, True])).dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or float16"):
        load_or_build_latents(tmp_path / "cache", source, np.arange(7), vae, SIZE, 3, True, 3, None, dtype="bf16")


class _Recorder:
    """Stands in for a shard array and records which rows are read from it."""

    def __init__(self, array):
        self.array, self.reads, self.shape, self.dtype = array, [], array.shape, array.dtype

    def __getitem__(self, key):
        self.reads.append(np.asarray(key[0]).tolist())
        return self.array[key]


def test_sample_reads_only_the_rows_of_its_batch_from_disk(tmp_path):
    source = write_images(tmp_path / "data")
    latents = build(tmp_path / "cache", source, tiny_vae())
    expect = latents.mean.clone()
    # the arrays follow the files: rows written to disk after opening are what a read returns
    index = json.loads(latents.path.read_text())
    on_disk = np.load(latents.path.parent / index["shards"][0]["mean"], mmap_mode="r+", allow_pickle=False)
    on_disk[5] = np.nan
    on_disk.flush()
    mean, _ = latents.rows(np.array([2, 0]), np.array([0, 1]))
    assert np.allclose(mean, expect[[2, 0], [0, 1]].numpy())
    assert np.isnan(latents.rows(np.array([5]), np.array([0]))[0]).all()
    rec = _Recorder(latents.means[0])
    latents.means[0] = rec
    latents.rows(np.array([6, 1, 3]), np.array([0, 0, 1]))
    assert rec.reads == [[1, 3, 6]]  # the batch's rows, nothing else


def test_sample_draws_around_the_posterior():
    mean = torch.randn(4, 2, 3, 2, 2)
    std = torch.rand(4, 2, 3, 2, 2) + 0.1
    latents = LatentSet(mean, std, np.arange(4), scaling_factor=0.5)
    rows, flip = torch.tensor([3, 0, 3]), torch.tensor([False, True, True])
    z = latents.sample(rows, flip, torch.Generator().manual_seed(0))
    eps = torch.randn((3, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    expect = (mean[rows, flip.long()] + std[rows, flip.long()] * eps) * 0.5
    assert torch.allclose(z, expect)
    many = torch.stack([latents.sample(torch.tensor([1]), torch.tensor([True]))[0] for _ in range(4000)])
    assert torch.allclose(many.mean(0), 0.5 * mean[1, 1], atol=0.1)
    assert torch.allclose(many.std(0), 0.5 * std[1, 1], rtol=0.1)
    plain = LatentSet(mean[:, :1], std[:, :1], np.arange(4), 1.0)
    assert plain.sample(torch.tensor([0, 1])).shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="hflip"):
        plain.sample(torch.tensor([0]), torch.tensor([True]))


def test_two_ranks_share_the_encoding(tmp_path):
    """Two gloo ranks: each encodes half, rank 0 writes one cache both read; a second call on the
    same ranks encodes nothing; the cache equals a one-process build."""
    source = write_images(tmp_path / "data")
    one = build(tmp_path / "one", source, tiny_vae())
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["first"] for r in ranks] == [2 * 4, 2 * 3]  # rows 0-3 and 4-6, plain + mirrored
    assert [r["second"] for r in ranks] == [0, 0]
    assert ranks[0]["mean_sum"] == ranks[1]["mean_sum"]
    vae = tiny_vae()
    calls = count_encodes(vae)
    two = load_or_build_latents(tmp_path / "two", source, np.arange(7), vae, SIZE, 3, True, 3, None)
    assert not calls  # one process finds the cache the two ranks wrote
    assert torch.allclose(two.mean, one.mean, atol=1e-6) and torch.allclose(two.std, one.std, atol=1e-6)
    index = json.loads(two.path.read_text())
    assert [(s["start"], s["count"]) for s in index["shards"]] == [(0, 4), (4, 3)]  # one shard per rank, not merged
    assert not any(p.name.startswith(".") for p in (tmp_path / "two").iterdir())  # no temporary files left


def _two_rank_main(out: Path) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    source = FileSource(sorted(str(p) for p in (out / "data").glob("*.png")), [0] * 7, ["a"], mode="RGB")
    vae = tiny_vae()
    calls = count_encodes(vae)
    latents = load_or_build_latents(out / "two", source, np.arange(7), vae, SIZE, 3, True, 3, acc)
    first = sum(calls)
    load_or_build_latents(out / "two", source, np.arange(7), vae, SIZE, 3, True, 3, acc)
    result = {"first": first, "second": sum(calls) - first, "mean_sum": float(latents.mean.double().sum())}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    _two_rank_main(Path(sys.argv[1]))
