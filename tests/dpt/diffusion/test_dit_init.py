"""DiT's initialisation (DiT's models.py, initialize_weights) on diffusers' DiTTransformer2DModel,
and DiT's constant learning rate."""

from __future__ import annotations

import torch

from dpt.diffusion.model import build_denoiser, denoiser_forward
from dpt.train_diffusion import final_lr_ratio
from semivit.config.schema import DiffusionConfig
from semivit.runtime.accelerator import warmup_cosine


def _dit():
    torch.manual_seed(0)
    dc = DiffusionConfig(model="dit", hidden_size=32, depth=2, num_heads=2, patch_size=2)
    return build_denoiser(dc, 10, 4, 8)


def test_adaln_zero_and_a_zero_final_layer():
    model = _dit()
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.norm1.linear.weight) == 0
        assert torch.count_nonzero(block.norm1.linear.bias) == 0
    for final in (model.proj_out_1, model.proj_out_2):
        assert torch.count_nonzero(final.weight) == 0 and torch.count_nonzero(final.bias) == 0
    x = torch.randn(3, 4, 8, 8)
    out = denoiser_forward(model, x, torch.tensor([1, 500, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # the model starts by predicting 0


def test_dit_weight_init_rules():
    model = _dit()
    q = model.transformer_blocks[0].attn1.to_q
    bound = (6 / (q.in_features + q.out_features)) ** 0.5  # Xavier-uniform
    assert 0.8 * bound < q.weight.abs().max() <= bound  # timm/torch default: 1/sqrt(in) = 0.58 bound
    assert torch.count_nonzero(q.bias) == 0
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert 0.01 < table.std() < 0.03  # N(0, 0.02)
    assert torch.count_nonzero(model.pos_embed.proj.bias) == 0


def test_the_zero_layers_still_learn():
    model = _dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 4, 8, 8)
    loss = (denoiser_forward(model, x, torch.tensor([10, 20, 30, 40]), torch.tensor([0, 1, 2, 3])) - x).pow(2).mean()
    loss.backward()
    assert model.proj_out_2.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.count_nonzero(model.proj_out_2.weight) > 0


def test_dits_constant_lr():
    dc = DiffusionConfig(lr_schedule="constant")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = warmup_cosine(opt, 0, 1000, final_lr_ratio(dc))
    lrs = []
    for _ in range(1000):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[-1] == 1e-4
    assert final_lr_ratio(DiffusionConfig(lr_schedule="cosine")) == 0.1
