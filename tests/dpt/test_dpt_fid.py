"""FID wrapper and synthetic class accuracy."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpt.errors import DPTError
from dpt.fid import fid_from_features, run_fid, synthetic_class_accuracy
from semivit.config.load import load_config
from semivit.config.schema import ModelConfig
from semivit.models.classifier import create_classifier, save_classifier


def test_fid_identical_zero_different_positive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g, dtype=torch.float64)
    b = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    same_dist = fid_from_features(a, b)
    shifted = fid_from_features(a, b + 2.0)
    assert 0 < same_dist < 1.0
    assert shifted == pytest.approx(8 * 4.0, rel=0.2)  # |mu_a - mu_b|^2 = 8 dims x 2^2


def test_fid_too_few():
    with pytest.raises(DPTError, match="at least 10 images"):
        fid_from_features(torch.randn(5, 4), torch.randn(50, 4))


def make_classifier(folder, classes, favour=None):
    model = create_classifier(ModelConfig(name="vit_micro_patch4", drop_path=0.0), len(classes), 8, 1)
    if favour is not None:  # a classifier that always answers `favour`
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[favour] = 10.0
    meta = {
        "classes": classes,
        "channels": 1,
        "image_size": 8,
        "mean": [0.5],
        "std": [0.5],
        "model": "vit_micro_patch4",
        "global_pool": "avg",
    }
    save_classifier(folder, model, model, meta)
    return folder


def make_synthetic(folder, classes, per_class, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    lines = ["file,label,class_name,seed,guidance_scale,sampler,steps,model"]
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(100 + shift, 40, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / name / f"{c:04d}_{i:06d}.png")
            lines.append(f"{name}/{c:04d}_{i:06d}.png,{c},{name},0,2.0,ddim,5,m")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def fid_cfg(tmp_path, real, fake, *extra):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"fid.real={real}",
            f"fid.fake={fake}",
            "fid.features=classifier",
            f"fid.classifier={tmp_path / 'clf'}",
            *extra,
        ],
    )


def test_run_fid_with_classifier_features(tmp_path):
    classes = ["a", "b"]
    make_classifier(tmp_path / "clf", classes)
    real = make_synthetic(tmp_path / "real", classes, 15, seed=1)
    same = make_synthetic(tmp_path / "same", classes, 15, seed=1)
    far = make_synthetic(tmp_path / "far", classes, 15, seed=2, shift=120)
    r_same = run_fid(fid_cfg(tmp_path, real, same, "fid.per_class=true"))
    r_far = run_fid(fid_cfg(tmp_path, real, far))
    assert r_same["fid"] == pytest.approx(0.0, abs=1e-4) and r_far["fid"] > 1e-2
    assert r_same["fid_features"].startswith("classifier:vit_micro_patch4")
    assert r_same["num_real"] == r_same["num_fake"] == 30
    assert set(r_same["per_class"]) == {"a", "b"}
    saved = json.loads((same / "fid.json").read_text())
    assert {"fid", "fid_features", "num_real", "num_fake"} <= set(saved)


def test_run_fid_errors(tmp_path):
    classes = ["a", "b"]
    make_classifier(tmp_path / "clf", classes)
    real = make_synthetic(tmp_path / "real", classes, 15)
    few = make_synthetic(tmp_path / "few", classes, 3)
    with pytest.raises(DPTError, match="holds 6 images"):
        run_fid(fid_cfg(tmp_path, real, few))
    cfg = fid_cfg(tmp_path, real, real, "fid.features=inception", f"fid.inception_weights={tmp_path / 'no.pth'}")
    with pytest.raises(DPTError, match=r"does not exist.*pt_inception.*fid.inception_weights=PATH"):
        run_fid(cfg)
    cfg = fid_cfg(tmp_path, real, real, "fid.features=inception")
    with pytest.raises(DPTError, match="download it once"):
        run_fid(cfg)
    with pytest.raises(DPTError, match="neither"):
        run_fid(fid_cfg(tmp_path, "nowhere", real))


def test_synthetic_class_accuracy(tmp_path):
    classes = ["a", "b", "c", "d"]
    clf = make_classifier(tmp_path / "clf", classes, favour=2)
    syn = make_synthetic(tmp_path / "syn", ["c", "a"], 6)  # manifest names map onto the classifier's ids
    acc = synthetic_class_accuracy(clf, syn)
    assert acc["synthetic_class_acc"] == pytest.approx(50.0)
    assert acc["per_class"] == {"a": 0.0, "c": 100.0} and acc["num_images"] == 12
    other = make_synthetic(tmp_path / "other", ["zebra"], 2)
    with pytest.raises(DPTError, match="zebra"):
        synthetic_class_accuracy(clf, other)
