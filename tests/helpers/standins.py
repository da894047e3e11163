"""Stand-ins for the files a user brings to a config, made at test time with random weights.

A shipped ImageNet config names an image folder, a Stable Diffusion VAE folder, the FID
Inception-v3 weights and MAE checkpoints. The tests never download any of them: these functions
write files of the same architecture and layout, so every loader and shape on the config's path
is exercised; only the numbers are meaningless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / ft-mse): 8x down-sampling to 4 latent channels
SD_VAE_BLOCKS = (128, 256, 512, 512)
SD_VAE_LATENT_CHANNELS = 4
SD_VAE_SCALING = 0.18215
# MAE pre-training files hold the encoder next to (some of) the decoder; the loader drops these
MAE_DECODER_DIM = 16


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def make_rgb_imagefolder(
    root: str | Path,
    classes: tuple[str, ...] = ("a", "b", "c"),
    per_class: int = 6,
    held_out_per_class: int = 2,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """``ROOT/train/<class>/*.png`` and ``ROOT/val/<class>/*.png``: RGB images whose colour and
    stripe direction depend on the class (so a classifier has something to tell apart) and whose
    noise and stripe phase differ per image."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", held_out_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = _class_image(c, len(classes), size, rng)
                Image.fromarray(img).save(folder / f"{name}_{i:03d}.png")
    return root


def _class_image(c: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    hue = np.array([np.cos(2 * np.pi * (c / num_classes + k / 3)) for k in range(3)])
    base = 127.5 + 90.0 * hue  # a colour per class
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * c / max(1, num_classes)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * 4 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = base[None, None, :] + 40.0 * stripes[..., None] + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def make_sd_vae(folder: str | Path, seed: int = 0) -> Path:
    """An ``AutoencoderKL.save_pretrained`` folder (safetensors) with Stable Diffusion's VAE
    architecture and random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(SD_VAE_BLOCKS)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=SD_VAE_BLOCKS,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=SD_VAE_LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=SD_VAE_SCALING,
    )
    folder = Path(folder)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_inception_file(path: str | Path, seed: int = 0) -> Path:
    """An FID Inception-v3 weights file in torch-fidelity's layout (the state dict of its
    ``FeatureExtractorInceptionV3``) with random weights, readable with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = _random_inception(path.parent / f".{path.name}.empty")
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


def _random_inception(empty_file: Path) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 as freshly initialised. Its constructor always loads weights
    (from the internet when given no file): it is given a file holding an empty dict, and the
    subclass ignores what it loads, so the random initialisation stays."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - keep the random weights
            return None

    torch.save({}, empty_file)
    try:
        net = RandomInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty_file))
    finally:
        empty_file.unlink(missing_ok=True)
    # torch's default conv init shrinks the signal ~6-fold per ReLU layer: after Inception's ~40
    # layers the 2048 features would be ~1e-8 and FID's covariances ~0. He init keeps them O(1).
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


def make_mae_checkpoint(path: str | Path, model_name: str, image_size: int = 224, seed: int = 0) -> Path:
    """A MAE pre-training checkpoint: ``torch.save({"model": state_dict})`` of the timm ViT
    ``model_name`` (no head, random weights) plus decoder tensors, as MAE's released files have."""
    import timm

    import semivit.models.classifier  # noqa: F401 - registers this project's small ViTs with timm

    torch.manual_seed(seed)
    encoder = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
    state = dict(encoder.state_dict())
    num_tokens = state["pos_embed"].shape[1]
    state["mask_token"] = torch.zeros(1, 1, MAE_DECODER_DIM)
    state["decoder_embed.weight"] = torch.randn(MAE_DECODER_DIM, encoder.embed_dim) * 0.02
    state["decoder_pos_embed"] = torch.zeros(1, num_tokens, MAE_DECODER_DIM)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    del encoder
    return path
