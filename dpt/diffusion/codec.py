"""Pixel space <-> model space: pixels as they are, or latents of a local AutoencoderKL (SD-VAE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpt.diffusion.model import load_pretrained
from dpt.errors import DPTError


def load_vae(path: str):
    from diffusers import AutoencoderKL

    p = Path(path)
    if not (p / "config.json").is_file():
        raise DPTError(
            f"diffusion.vae='{path}' is not a local AutoencoderKL folder (config.json missing); save one with "
            "AutoencoderKL.save_pretrained(DIR) on a machine with internet and point diffusion.vae at DIR"
        )
    vae = load_pretrained(AutoencoderKL, p, "VAE folder (diffusion.vae)")
    vae.requires_grad_(False)
    return vae.eval()


class Codec:
    """Maps images in [-1, 1] to the denoiser's space and back (identity in pixel space)."""

    def __init__(self, vae=None):
        self.vae = vae
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0)) if vae is not None else 1.0

    def to(self, device):
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample().float() * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z.clamp(-1, 1)
        return self.vae.decode((z / self.scale).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def model_space(vae, channels: int, image_size: int) -> tuple[int, int]:
    """(channels, size) the denoiser works on."""
    if vae is None:
        return channels, image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise DPTError(f"diffusion.image_size={image_size} must be divisible by the VAE's factor {factor}")
    return int(vae.config.latent_channels), image_size // factor
