"""Masked autoencoder (MAE) around a timm VisionTransformer, for self-pre-training (stage 0).

The encoder is an unmodified timm ``VisionTransformer`` (so its state dict loads straight into a
classifier); only the 25% visible patches go through it. A light decoder of timm ``Block``s fills
in mask tokens and predicts the pixels of every patch; the loss counts the masked ones only.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from semivit.config.schema import ModelConfig, PretrainConfig
from semivit.errors import ConfigError
from semivit.models.classifier import create_classifier


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch, c=channels)


class MAE(nn.Module):
    def __init__(self, encoder: VisionTransformer, cfg: PretrainConfig):
        super().__init__()
        if encoder.num_prefix_tokens != 1 or not encoder.has_class_token:
            raise ConfigError("MAE pre-training expects a ViT with one class token and no register tokens")
        self.encoder = encoder
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.channels = encoder.patch_embed.proj.in_channels
        num_patches = self.grid[0] * self.grid[1]
        dim, ddim = encoder.embed_dim, cfg.decoder_dim

        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, ddim))
        self.decoder_blocks = nn.Sequential(
            *[Block(ddim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(ddim)
        self.decoder_pred = nn.Linear(ddim, self.patch * self.patch * self.channels)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)

    def random_masking(self, tokens: torch.Tensor, generator: torch.Generator | None = None):
        """Keep a random (1 - mask_ratio) share of patches per image; mask is 1 where hidden."""
        b, n, d = tokens.shape
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        noise = torch.rand(b, n, device=tokens.device, generator=generator)
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        kept = torch.gather(tokens, 1, order[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=tokens.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None):
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, generator)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        x = enc.norm(enc.blocks(x))
        return x, mask, restore

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = restore.shape
        fill = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        # put every token back at its patch position before the decoder adds positions
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        latent, mask, restore = self.encode(images, generator)
        pred = self.decode(latent, restore)
        err = (pred.float() - self.target(images).float()).pow(2).mean(dim=-1)
        loss = (err * mask).sum() / mask.sum()
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """(masked input, reconstruction with visible patches kept) in the input's pixel space."""
        _, pred, mask = self(images, generator)
        pred = pred.float()
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            t = patchify(images, self.patch).float()
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)
        m = mask[:, :, None]
        orig = patchify(images, self.patch).float()
        masked = unpatchify(orig * (1 - m), self.patch, self.channels, self.grid)
        recon = unpatchify(orig * (1 - m) + pred * m, self.patch, self.channels, self.grid)
        return masked, recon


def create_mae(mcfg: ModelConfig, pcfg: PretrainConfig, image_size: int, in_chans: int) -> MAE:
    """The encoder is the classifier architecture without head; 'token' pooling keeps its final
    LayerNorm (``norm``), which MAE normalises latents with; fine-tuning uses fc_norm instead."""
    enc_cfg = ModelConfig(name=mcfg.name, drop_path=0.0, global_pool="token", init="none")
    try:
        encoder = create_classifier(enc_cfg, num_classes=0, image_size=image_size, in_chans=in_chans)
    except ConfigError:  # e.g. a CNN has no 'token' pooling: say what is wrong with it first
        enc_cfg.global_pool = "avg"
        encoder = create_classifier(enc_cfg, num_classes=0, image_size=image_size, in_chans=in_chans)
        if isinstance(encoder, VisionTransformer):
            raise
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(
            f"stage 0 (MAE pre-training) needs a ViT; model.name='{mcfg.name}' is a {type(encoder).__name__}. "
            "Start it from a local weights file (model.init=PATH) or from scratch (model.init=none), "
            "which skips stage 0"
        )
    return MAE(encoder, pcfg)
