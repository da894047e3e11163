"""FID as the field computes it: Inception features of images of any size and mode, statistics
accumulated in fixed memory, reference statistics stored and reused, published .npz statistics."""

import json

import numpy as np
import pytest
import torch
from helpers.mixed_images import make_mixed_imagefolder, mixed_image
from PIL import Image

import dpt.fid as fid_mod
from dpt.cli import main
from dpt.errors import DPTError
from dpt.fid import FeatureStats, fid_from_features, fid_from_stats, inception_transform, spread


def test_one_resize_and_crop_rule_for_every_size_and_mode():
    rng = np.random.default_rng(0)
    tf = inception_transform(32)
    for mode in ("RGB", "L", "RGBA", "I;16", "P", "CMYK"):
        for h, w in ((17, 90), (90, 17), (40, 40), (300, 500)):
            x = tf(mixed_image(rng, mode, h, w))
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    # the centre: a wide image keeps its middle columns
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255
    assert inception_transform(10)(Image.fromarray(img)).float().mean() > 250


def test_streamed_statistics_equal_torchmetrics_on_all_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(250, 6, generator=g, dtype=torch.float64) + 0.5
    sa, sb = FeatureStats(6), FeatureStats(6)
    for chunk in a.split(37):
        sa.update(chunk)
    for chunk in b.split(50):
        sb.update(chunk)
    mu, sigma = sa.mu_sigma()
    assert np.allclose(mu, a.mean(0).numpy()) and np.allclose(sigma, np.cov(a.numpy(), rowvar=False))
    assert fid_from_stats(*sa.mu_sigma(), *sb.mu_sigma()) == pytest.approx(fid_from_features(a, b), rel=1e-6)
    assert sorted(spread(1000, 7).tolist()) == [0, 166, 333, 500, 666, 832, 999] and len(spread(5, 0)) == 5


def test_inception_score_of_uniform_and_certain_predictions():
    sure = FeatureStats(2, is_splits=2, num_logits=4)
    logits = torch.full((8, 4), -30.0)
    logits[torch.arange(8), (torch.arange(8) // 2) % 4] = 30.0  # certain, every class once per split
    sure.update(torch.zeros(8, 2), logits, np.arange(8))
    assert sure.inception_score()[0] == pytest.approx(4.0, rel=1e-4)
    unsure = FeatureStats(2, is_splits=2, num_logits=4)
    unsure.update(torch.zeros(8, 2), torch.zeros(8, 4), np.arange(8))
    assert unsure.inception_score()[0] == pytest.approx(1.0)


def _fake_folder(folder, n=12, seed=3):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        mixed_image(rng, ("RGB", "L", "RGBA")[i % 3], int(rng.integers(20, 70)), int(rng.integers(20, 70))).save(
            folder / f"{i:03d}.png")
    return folder


def test_dpt_fid_inception_on_images_of_different_sizes(tmp_path, inception_weights, monkeypatch):
    make_mixed_imagefolder(tmp_path / "data", per_class=4, held_out=4)
    fake = _fake_folder(tmp_path / "fake")
    calls = []
    real_extract = fid_mod.extract_stats
    monkeypatch.setattr(fid_mod, "extract_stats", lambda *a, **k: calls.append(k.get("desc")) or real_extract(*a, **k))
    args = ["fid", f"output_dir={tmp_path / 'run'}", "fid.features=inception", f"fid.inception_weights={inception_weights}",
            f"fid.real={tmp_path / 'data' / 'val'}", f"fid.fake={fake}", "fid.image_size=64", "fid.batch_size=5",
            "fid.inception_score=true"]
    assert main(args) == 0
    first = json.loads((fake / "fid.json").read_text())
    assert first["num_real"] == 12 and first["num_fake"] == 12 and np.isfinite(first["fid"]) and first["fid"] > 0
    assert first["inception_score"] >= 1.0 and "centre crop" in first["image_rule"]
    stored = list((tmp_path / "run" / "cache" / "fid").glob("*.npz"))
    assert len(stored) == 1 and calls == ["FID reference", "FID generated"]
    with np.load(stored[0], allow_pickle=False) as z:
        assert set(z.files) == {"mu", "sigma", "count", "key"} and int(z["count"]) == 12
        mu, sigma = z["mu"], z["sigma"]
    assert main(args) == 0  # a second run reuses the reference statistics
    assert calls == ["FID reference", "FID generated", "FID generated"]
    assert json.loads((fake / "fid.json").read_text())["fid"] == pytest.approx(first["fid"], rel=1e-9)
    # published statistics: an .npz with only mu and sigma
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=mu, sigma=sigma)
    assert main([*args[:-1], f"fid.reference={tmp_path / 'VIRTUAL_ref.npz'}", "fid.num_samples=10"]) == 0
    third = json.loads((fake / "fid.json").read_text())
    assert third["num_fake"] == 10 and third["real"].endswith("VIRTUAL_ref.npz")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(DPTError, match="lacks array"):
        fid_mod.load_reference_npz(tmp_path / "bad.npz")


def test_two_ranks_give_the_fid_of_one(tmp_path):
    """Each rank extracts its share, the sums are added once: the same statistics as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers.tiny_models import make_tiny_classifier

    root = Path(__file__).resolve().parents[2]
    make_mixed_imagefolder(tmp_path / "data", per_class=5, held_out=5)
    fake = _fake_folder(tmp_path / "fake", n=13)
    make_tiny_classifier(tmp_path / "clf", ["a", "b", "c"], channels=3, size=16)

    def args(out):
        return ["fid", f"output_dir={tmp_path / out}", "fid.features=classifier", f"fid.classifier={tmp_path / 'clf'}",
                f"fid.real={tmp_path / 'data' / 'train'}", f"fid.fake={fake}", "fid.batch_size=4",
                f"fid.out={tmp_path / out / 'fid.json'}"]

    assert main(args("one")) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29543",
           "-m", "dpt", *args("two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "fid.json").read_text())
    two = json.loads((tmp_path / "two" / "fid.json").read_text())
    assert (two["num_real"], two["num_fake"]) == (one["num_real"], one["num_fake"]) == (15, 13)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert len(list((tmp_path / "two" / "cache" / "fid").glob("*.npz"))) == 1
