"""Tiny stand-ins for the models of a run (classifier, VAE, class-conditional generator), with
random weights, written in the layouts the project's loaders read. For tests and the scale model."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_classifier(folder: str | Path, classes: list[str], channels: int = 3, size: int = 16, seed: int = 0) -> Path:
    """A classifier folder (meta.json + weights) of the tiny config's ViT."""
    from semivit.config.schema import ModelConfig
    from semivit.models.classifier import create_classifier, save_classifier

    torch.manual_seed(seed)
    model = create_classifier(ModelConfig(name="vit_micro_patch4", drop_path=0.0), len(classes), size, channels)
    meta = {"classes": list(classes), "channels": channels, "image_size": size, "mean": [0.5] * channels,
            "std": [0.5] * channels, "model": "vit_micro_patch4", "global_pool": "avg"}
    save_classifier(folder, model, model, meta)
    return Path(folder)


def make_tiny_vae(folder: str | Path, size: int = 16, seed: int = 0) -> Path:
    """An ``AutoencoderKL.save_pretrained`` folder: two levels (halves the size once), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=size)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def make_tiny_generator(folder: str | Path, classes: list[str], channels: int = 3, size: int = 16) -> Path:
    """A generator folder as train-diffusion writes it: the tiny config's pixel-space DiT."""
    from dpt.diffusion.model import build_denoiser, save_generator
    from dpt.diffusion.sampling import make_noise_scheduler
    from semivit.config.schema import DiffusionConfig

    dcfg = DiffusionConfig(image_size=size, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_train_timesteps=100)
    k = len(classes)
    model = build_denoiser(dcfg, k, channels, size)
    meta = {"classes": list(classes), "num_classes": k, "null_label": k, "channels": channels, "image_size": size,
            "model_channels": channels, "model_size": size, "vae": "", "latent_scaling": 1.0, "data": "imagefolder",
            "labels": "true"}
    save_generator(Path(folder), model, make_noise_scheduler(dcfg, latent=False), meta)
    return Path(folder)
