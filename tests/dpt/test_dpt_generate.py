"""Generation: per-image seeding across processes, resumable atomic writes, manifest, names."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpt.diffusion.model import build_denoiser, save_generator
from dpt.diffusion.sampling import make_noise_scheduler
from dpt.errors import DPTError
from dpt.generate import MANIFEST_COLUMNS, class_dirs, load_synthetic_source, run_generate, safe_name
from semivit.config.load import load_config
from semivit.config.schema import DiffusionConfig

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["cat", "../evil", "a/b"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = DiffusionConfig(patch_size=2, hidden_size=32, depth=2, num_heads=2)
    model = build_denoiser(cfg, len(CLASSES), channels=1, sample_size=8)
    meta = {
        "classes": CLASSES,
        "num_classes": 3,
        "null_label": 3,
        "channels": 1,
        "image_size": 8,
        "model_channels": 1,
        "model_size": 8,
        "vae": "",
    }
    folder = tmp_path_factory.mktemp("gen") / "model"
    save_generator(folder, model, make_noise_scheduler(cfg, latent=False), meta)
    return folder


def overrides(model_dir, out, n=4, **extra):
    pairs = [
        f"generate.model={model_dir}",
        f"generate.out={out}",
        f"generate.num_per_class={n}",
        "generate.steps=3",
        "generate.batch_size=3",
        "tensorboard=false",
    ]
    return pairs + [f"generate.{k}={v}" for k, v in extra.items()]


def gen(model_dir, out, n=4, **extra):
    return run_generate(load_config(None, overrides(model_dir, out, n, **extra)))


def manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_layout_manifest_and_safe_names(model_dir, tmp_path):
    out = gen(model_dir, tmp_path / "syn")
    rows = manifest(out)
    assert list(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == 12 and len({r["file"] for r in rows}) == 12
    assert {r["class_name"] for r in rows} == set(CLASSES)
    for r in rows:
        p = (out / r["file"]).resolve()
        assert out.resolve() in p.parents and p.is_file()
        assert r["sampler"] == "dpmsolver++" and r["steps"] == "3" and float(r["guidance_scale"]) == 2.0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a_b", "cat", "evil"]
    assert (out / "grid.png").is_file()
    assert Image.open(out / "grid.png").size[1] > 3 * 8  # three rows
    m = json.loads((out / "metrics.json").read_text())
    assert m["generated_this_run"] == 12 and m["images_per_second"] > 0
    # images differ between indices and classes
    a, b = pixels(out / rows[0]["file"]), pixels(out / rows[1]["file"])
    assert np.abs(a - b).max() > 10


def test_safe_names():
    assert safe_name("../..") == "class" and safe_name(".hidden") == "hidden"
    dirs = class_dirs(["a/b", "a_b", "..", "ok"])
    assert len(set(dirs)) == 4 and all("/" not in d and not d.startswith(".") for d in dirs)


def test_resume_skips_existing_and_ignores_partial(model_dir, tmp_path):
    out = gen(model_dir, tmp_path / "syn")
    before = {r["file"]: pixels(out / r["file"]) for r in manifest(out)}
    # an interrupted run: two images never written, one half-written temporary file left behind
    gone = ["cat/0000_000003.png", "a_b/0002_000001.png"]
    for f in gone:
        (out / f).unlink()
    (out / "cat" / ".0000_000003.png.abcd.tmp").write_bytes(b"\x89PNG partial")
    keep = out / "evil" / "0001_000000.png"
    os.utime(keep, (1, 1))
    out = gen(model_dir, tmp_path / "syn")
    m = json.loads((out / "metrics.json").read_text())
    assert m["generated_this_run"] == 2  # only the missing ones
    assert keep.stat().st_mtime == 1  # an existing image is not regenerated
    rows = manifest(out)
    assert len(rows) == 12 and len({r["file"] for r in rows}) == 12
    for f in gone:  # the same seed gives the same image, whatever its batch
        assert np.abs(pixels(out / f) - before[f]).max() <= 1
    # more per class extends the set; fewer keeps what exists
    gen(model_dir, tmp_path / "syn", n=5)
    assert len(manifest(out)) == 15
    # other settings into the same folder would make the manifest lie
    with pytest.raises(DPTError, match="other settings"):
        gen(model_dir, tmp_path / "syn", guidance_scale=4.0)


def test_classes_subset_and_unknown(model_dir, tmp_path):
    out = gen(model_dir, tmp_path / "sub", n=2, classes="cat")
    assert {r["class_name"] for r in manifest(out)} == {"cat"}
    with pytest.raises(DPTError, match="unknown class 'dog'"):
        gen(model_dir, tmp_path / "sub2", n=2, classes="dog")


def test_load_synthetic_source(model_dir, tmp_path):
    out = gen(model_dir, tmp_path / "syn")
    classes = ["a/b", "zebra", "cat", "../evil"]  # another order, an extra class: mapped by name
    src = load_synthetic_source(out, classes, channels=1)
    assert len(src) == 12 and src.classes == classes
    assert sorted(np.bincount(src.targets, minlength=4).tolist()) == [0, 4, 4, 4]
    assert src.load(0).mode == "L"
    two = load_synthetic_source(out, classes, channels=1, per_class=2, seed=1)
    again = load_synthetic_source(out, classes, channels=1, per_class=2, seed=1)
    assert len(two) == 6 and two.paths == again.paths
    with pytest.raises(DPTError, match="fewer than"):
        load_synthetic_source(out, classes, channels=1, per_class=9)
    with pytest.raises(DPTError, match="classes that the data set does not"):
        load_synthetic_source(out, ["cat"], channels=1)
    (out / "cat" / "0000_000000.png").unlink()
    with pytest.raises(DPTError, match="missing"):
        load_synthetic_source(out, classes, channels=1)
    with pytest.raises(DPTError, match="not a synthetic data set"):
        load_synthetic_source(tmp_path, classes, channels=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_images_on_one_and_two_processes(model_dir, tmp_path):
    one = gen(model_dir, tmp_path / "one", n=4)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "dpt",
        "generate",
        *overrides(model_dir, tmp_path / "two", 4),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[:4000]
    two = tmp_path / "two"
    assert json.loads((two / "metrics.json").read_text())["num_processes"] == 2
    r1, r2 = manifest(one), manifest(two)
    assert [(r["file"], r["seed"]) for r in r1] == [(r["file"], r["seed"]) for r in r2]
    for r in r1:
        assert np.abs(pixels(one / r["file"]) - pixels(two / r["file"])).max() <= 1
