"""``semivit predict``: a classifier folder labels a folder of new images of any size into a CSV,
one row per image, on one or two ranks."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.own_data import save_image

from semivit.config.schema import ModelConfig
from semivit.errors import ConfigError, DataError
from semivit.models.classifier import create_classifier, save_classifier

ROOT = Path(__file__).resolve().parents[3]
CLASSES = ["ant", "bee", "cow", "dog", "eel", "fox"]


@pytest.fixture
def classifier(tmp_path) -> Path:
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name="vit_micro_patch4", drop_path=0.0, init="none"), len(CLASSES), 16, 3)
    meta = {"classes": CLASSES, "channels": 3, "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
            "model": "vit_micro_patch4", "global_pool": "avg"}
    folder = tmp_path / "clf"
    save_classifier(folder, model, None, meta)
    return folder


@pytest.fixture
def images(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for i, ((w, h), mode) in enumerate(zip([(9, 9), (64, 31), (300, 200), (17, 90), (40, 40)], ["RGB", "L", "RGBA", "P", "CMYK"], strict=True)):
        p = tmp_path / "new" / ("deep/er" if i % 2 else "") / f"n{i}{'.jpg' if mode == 'CMYK' else '.png'}"
        save_image(p, rng.integers(0, 255, (h, w, 3), dtype=np.uint8), mode)
        out.append(str(p))
    (tmp_path / "new" / "readme.md").write_text("not an image")
    return out


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check(rows: list[dict], images: list[str]) -> None:
    assert sorted(r["path"] for r in rows) == sorted(images)  # each image once
    for r in rows:
        top = [kv.rsplit(":", 1) for kv in r["top5"].split(";")]
        assert len(top) == 5 and top[0][0] == r["class"] and r["class"] in CLASSES
        probs = [float(p) for _, p in top]
        assert probs == sorted(probs, reverse=True) and abs(probs[0] - float(r["confidence"])) < 1e-4


def test_predict_a_folder_of_images_of_different_sizes(tmp_path, classifier, images):
    from semivit.cli import main

    out = tmp_path / "preds.csv"
    rc = main(["predict", "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
               f"checkpoint={classifier}", f"predict.images={tmp_path / 'new'}", f"predict.out={out}"])
    assert rc == 0
    rows = read(out)
    check(rows, images)
    # a list file names the same images; the same model gives the same labels
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(images[::-1]) + "\n")
    rc = main(["predict", "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
               f"checkpoint={classifier}", f"predict.images={listing}"])
    assert rc == 0
    again = read(tmp_path / "run" / "predictions" / "clf.csv")
    assert [r["path"] for r in again] == images[::-1]
    by_path = {r["path"]: r["class"] for r in rows}
    assert all(by_path[r["path"]] == r["class"] for r in again)


def test_predict_errors_name_the_setting(tmp_path, classifier, images):
    from semivit.config.load import load_config
    from semivit.stages.predict import run_predict

    base = [f"output_dir={tmp_path / 'run'}", f"checkpoint={classifier}"]
    with pytest.raises(ConfigError, match="predict.images"):
        run_predict(load_config(None, base))
    with pytest.raises(DataError, match="predict.images='.*nowhere' not found"):
        run_predict(load_config(None, [*base, f"predict.images={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="not a classifier folder"):
        run_predict(load_config(None, [f"checkpoint={tmp_path}", f"predict.images={tmp_path / 'new'}"]))
    Path(images[0]).write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot be read: '.*n0.png'"):
        run_predict(load_config(None, [*base, f"predict.images={tmp_path / 'new'}"]))


def test_predict_on_two_ranks_labels_each_image_once(tmp_path, classifier, images):
    out = tmp_path / "preds2.csv"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "semivit", "predict", "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
        f"checkpoint={classifier}", f"predict.images={tmp_path / 'new'}", f"predict.out={out}", "predict.batch_size=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read(out)
    assert len(rows) == 5  # 5 images over 2 ranks in batches of 2: the padding repeat is dropped
    check(rows, images)
