"""Session fixtures: the stand-ins for user-supplied files (tests/helpers/standins.py), each made
once per test session in a temporary folder and only when a test asks for it (the VAE, Inception
and ViT weight files take seconds and hundreds of MB)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers importable as `helpers`

from helpers.standins import (  # noqa: E402
    make_inception_file,
    make_mae_checkpoint,
    make_rgb_imagefolder,
    make_sd_vae,
)

# enough training images per class for a smoke run of every shipped config: the largest labeled
# count (4 per class, dpt_cifar10_4labels) plus the 3 unlabeled ones semivit.smoke keeps
STANDIN_TRAIN_PER_CLASS = 8


@pytest.fixture(scope="session")
def rgb_imagefolder(tmp_path_factory) -> Path:
    """An ImageNet-style folder (train/<class>/, val/<class>/) of three RGB classes."""
    return make_rgb_imagefolder(
        tmp_path_factory.mktemp("standin_images"), per_class=STANDIN_TRAIN_PER_CLASS, held_out_per_class=2
    )


@pytest.fixture(scope="session")
def sd_vae(tmp_path_factory) -> Path:
    """A Stable Diffusion-architecture AutoencoderKL folder with random weights."""
    return make_sd_vae(tmp_path_factory.mktemp("standin_vae") / "sd-vae")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight FID Inception-v3 file in torch-fidelity's layout."""
    return make_inception_file(tmp_path_factory.mktemp("standin_inception") / "pt_inception-standin.pth")


@pytest.fixture(scope="session")
def mae_checkpoint(tmp_path_factory):
    """``mae_checkpoint(model_name, image_size=224) -> Path``: a MAE-format checkpoint of that timm
    ViT with random weights, written once per (name, size) in the session."""
    folder = tmp_path_factory.mktemp("standin_mae")
    made: dict[tuple[str, int], Path] = {}

    def get(model_name: str, image_size: int = 224) -> Path:
        key = (model_name, image_size)
        if key not in made:
            made[key] = make_mae_checkpoint(folder / f"mae_{model_name}_{image_size}.pth", model_name, image_size)
        return made[key]

    return get
