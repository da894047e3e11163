"""The denoiser, classifier-free guidance, label handling and the saved model folder."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from dpt.diffusion.model import (
    build_denoiser,
    denoiser_forward,
    drop_labels,
    load_generator,
    num_classes_of,
    save_generator,
)
from dpt.diffusion.sampling import guided_prediction, make_noise_scheduler, make_sampler, predict, sample
from dpt.errors import DPTError
from semivit.config.schema import DiffusionConfig


def tiny_cfg(**kw) -> DiffusionConfig:
    base = dict(model="dit", patch_size=2, hidden_size=32, depth=2, num_heads=2, unet_channels=[32, 32])
    base.update(kw)
    return DiffusionConfig(**base)


# --- guidance -------------------------------------------------------------------------------


def test_guided_prediction_hand_made():
    cond = torch.full((2, 3, 4, 4), 2.0)
    uncond = torch.full((2, 3, 4, 4), 0.5)
    doubled = torch.cat([cond, uncond])
    assert torch.allclose(guided_prediction(doubled, 0.0), uncond)
    assert torch.allclose(guided_prediction(doubled, 1.0), cond)
    # w = 3: 0.5 + 3 * 1.5 = 5.0, on every channel (also the 4th-channel-style last one)
    out = guided_prediction(doubled, 3.0)
    assert torch.allclose(out, torch.full_like(cond, 5.0))
    with pytest.raises(ValueError):
        guided_prediction(torch.zeros(3, 1, 2, 2), 2.0)


class Recorder(torch.nn.Module):
    """A stand-in denoiser: output = label id broadcast, records the batch sizes it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(list(class_labels.tolist()))
        return type("Out", (), {"sample": class_labels.float()[:, None, None, None].expand_as(x).clone()})()


def test_predict_uses_one_pass_for_w0_and_w1(monkeypatch):
    import dpt.diffusion.sampling as d

    rec = Recorder()
    monkeypatch.setattr(d, "denoiser_forward", lambda m, x, t, y: m(x, t, class_labels=y).sample)
    x, labels, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 3]), torch.tensor(5)
    out0 = predict(rec, x, t, labels, null_label=7, w=0.0)
    out1 = predict(rec, x, t, labels, null_label=7, w=1.0)
    outw = predict(rec, x, t, labels, null_label=7, w=2.0)
    assert rec.calls == [[7, 7], [1, 3], [1, 3, 7, 7]]  # w=0 and w=1: no doubled batch
    assert torch.all(out0 == 7) and torch.equal(out1[:, 0, 0, 0], torch.tensor([1.0, 3.0]))
    # 7 + 2 * (y - 7)
    assert torch.equal(outw[:, 0, 0, 0], torch.tensor([-5.0, -1.0]))


# --- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10, 17])
@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_null_label_is_k(k, kind):
    model = build_denoiser(tiny_cfg(model=kind), k, channels=1, sample_size=8).eval()
    assert num_classes_of(model) == k
    tables = [m.embedding_table for m in model.modules() if hasattr(m, "embedding_table")]
    if kind == "unet":
        tables = [model.class_embedding]
    assert tables and all(t.num_embeddings == k + 1 for t in tables)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        cond = denoiser_forward(model, x, t, torch.tensor([0, k - 1]))
        null = denoiser_forward(model, x, t, torch.tensor([k, k]))
    assert cond.shape == null.shape == x.shape
    with pytest.raises(IndexError):
        denoiser_forward(model, x, t, torch.tensor([k + 1, 0]))


def test_unet_attention_levels_place_attention_at_the_lowest_resolutions():
    model = build_denoiser(tiny_cfg(model="unet", unet_attention_levels=1), 3, channels=1, sample_size=8)
    assert [type(b).__name__ for b in model.down_blocks] == ["DownBlock2D", "AttnDownBlock2D"]
    plain = build_denoiser(tiny_cfg(model="unet", unet_attention_levels=0), 3, channels=1, sample_size=8)
    assert not any("Attn" in type(b).__name__ for b in plain.down_blocks + plain.up_blocks)
    for bad in (dict(unet_attention_levels=3), dict(unet_attention_levels=-1), dict(unet_layers_per_block=0)):
        with pytest.raises(DPTError, match="unet_attention_levels"):
            build_denoiser(tiny_cfg(model="unet", **bad), 3, channels=1, sample_size=8)


def test_no_internal_label_dropout_in_train_mode():
    torch.manual_seed(0)
    model = build_denoiser(tiny_cfg(), 5, channels=1, sample_size=8)
    assert all(m.dropout_prob == 0 for m in model.modules() if hasattr(m, "embedding_table"))
    x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 300), torch.arange(64) % 5
    model.eval()
    with torch.no_grad():
        ref = denoiser_forward(model, x, t, y)
    model.train()
    with torch.no_grad():
        # with diffusers' own 10% dropout, 64 samples x 2 blocks would almost surely see a dropped label
        for _ in range(3):
            assert torch.allclose(denoiser_forward(model, x, t, y), ref, atol=1e-6)


def test_drop_labels_rate_and_null():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(20000, dtype=torch.long)
    out = drop_labels(y, null_label=9, p_uncond=0.1, generator=g)
    assert set(out.unique().tolist()) == {0, 9}
    assert abs((out == 9).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 9, 0.0), y)


# --- sampling and the saved folder ----------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"])
def test_sampling_is_per_image_deterministic(sampler):
    torch.manual_seed(0)
    model = build_denoiser(tiny_cfg(), 3, channels=1, sample_size=8).eval()
    sched = make_noise_scheduler(tiny_cfg(), latent=False)
    from dpt.diffusion.sampling import image_noise

    def run(seeds, labels):
        noise, gens = image_noise(seeds, (1, 8, 8))
        return sample(model, make_sampler(sched.config, sampler), noise, torch.tensor(labels), 3, 2.0, 4, gens)

    both = run([11, 22], [0, 2])
    alone = run([22], [2])
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_denoiser(cfg, 4, channels=1, sample_size=8).eval()
    sched = make_noise_scheduler(cfg, latent=False)
    meta = {
        "classes": list("abcd"),
        "null_label": 4,
        "channels": 1,
        "image_size": 8,
        "model_channels": 1,
        "model_size": 8,
    }
    save_generator(tmp_path / "model", model, sched, meta)
    loaded, sched_cfg, meta2 = load_generator(tmp_path / "model")
    plain = DiTTransformer2DModel.from_pretrained(str(tmp_path / "model")).eval()  # a diffusers user's view
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 999]), torch.tensor([3, 4])
    with torch.no_grad():
        ref = denoiser_forward(model, x, t, y)
        assert torch.allclose(denoiser_forward(loaded, x, t, y), ref)
        assert torch.allclose(denoiser_forward(plain, x, t, y), ref)
    assert meta2["classes"] == list("abcd") and sched_cfg["beta_schedule"] == cfg.beta_schedule
    # overwrite in place keeps one folder
    save_generator(tmp_path / "model", model, sched, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unet_round_trip(tmp_path):
    cfg = tiny_cfg(model="unet")
    model = build_denoiser(cfg, 2, channels=3, sample_size=8).eval()
    meta = {
        "classes": ["x", "y"],
        "null_label": 2,
        "channels": 3,
        "image_size": 8,
        "model_channels": 3,
        "model_size": 8,
    }
    save_generator(tmp_path / "m", model, make_noise_scheduler(cfg, latent=False), meta)
    loaded, _, _ = load_generator(tmp_path / "m")
    assert isinstance(loaded, UNet2DModel) and num_classes_of(loaded) == 2


def test_load_generator_errors(tmp_path):
    with pytest.raises(DPTError, match="not found"):
        load_generator(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(DPTError, match="not a diffusers model folder"):
        load_generator(tmp_path / "other")
    cfg = tiny_cfg()
    model = build_denoiser(cfg, 4, channels=1, sample_size=8)
    bad = {"classes": ["a", "b"], "null_label": 2, "channels": 1, "image_size": 8, "model_channels": 1, "model_size": 8}
    save_generator(tmp_path / "k", model, make_noise_scheduler(cfg, latent=False), bad)
    with pytest.raises(DPTError, match="has 4 classes"):
        load_generator(tmp_path / "k")


def test_build_errors():
    with pytest.raises(DPTError, match="patch_size"):
        build_denoiser(tiny_cfg(patch_size=3), 2, 1, 8)
    with pytest.raises(DPTError, match="unknown diffusion.model"):
        build_denoiser(tiny_cfg(model="gan"), 2, 1, 8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"])
def test_samplers_reach_the_data_with_an_imperfect_denoiser(sampler, monkeypatch):
    """One-image data set: the exact noise prediction is known. With 5% error on it every sampler must
    still land on the image (an unclipped DPM-Solver++ on the cosine schedule returns noise)."""
    import dpt.diffusion.sampling as d
    from dpt.diffusion.sampling import image_noise

    torch.manual_seed(0)
    target = torch.rand(1, 1, 8, 8) * 2 - 1
    train = make_noise_scheduler(DiffusionConfig(), latent=False)
    ab = train.alphas_cumprod

    def denoiser(model, x, t, y):
        a = ab[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt() + 0.05 * torch.randn_like(x)

    monkeypatch.setattr(d, "denoiser_forward", denoiser)
    noise, gens = image_noise([1, 2], (1, 8, 8))
    out = sample(None, make_sampler(train.config, sampler), noise, torch.tensor([0, 1]), 2, 2.0, 25, gens)
    assert (out - target).abs().max() < 0.1


def test_min_snr_weights_count_every_target_as_the_same_epsilon_loss():
    """x0, v and epsilon predictions with min-SNR weights give the same loss for the same denoised
    estimate: each is min(SNR, gamma) times the epsilon-space error."""
    from diffusers import DDPMScheduler

    from dpt.diffusion.sampling import loss_weights, training_target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    est_x0 = x0 + 0.1 * torch.randn(6, 1, 4, 4, generator=g)  # one imperfect estimate of the clean image
    losses = {}
    for kind in ("sample", "epsilon", "v_prediction"):
        sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
        a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = sch.add_noise(x0, noise, t)
        est_eps = (xt - a.sqrt() * est_x0) / (1 - a).sqrt()  # the same estimate in each target's terms
        pred = {"sample": est_x0, "epsilon": est_eps, "v_prediction": a.sqrt() * est_eps - (1 - a).sqrt() * est_x0}[kind]
        err = (pred - training_target(sch, x0, noise, t)).pow(2).flatten(1).mean(1)
        losses[kind] = loss_weights(sch, t, 5.0) * err
        assert loss_weights(sch, t, 0.0) is None
    assert torch.allclose(losses["sample"], losses["epsilon"], rtol=1e-3, atol=1e-6)
    assert torch.allclose(losses["v_prediction"], losses["epsilon"], rtol=1e-3, atol=1e-6)
    sch = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    w = loss_weights(sch, t, 5.0)
    assert w.max() <= 5.0 and w[0] == 5.0 and w[-1] < 1e-3  # capped where nearly clean, tiny where pure noise


def test_guidance_min_t_guides_only_the_noisier_steps(monkeypatch):
    import dpt.diffusion.sampling as d
    from dpt.diffusion.sampling import image_noise

    seen = []

    def fake_predict(model, x, t, labels, null_label, w):
        seen.append((int(t), w))
        return torch.zeros_like(x)

    monkeypatch.setattr(d, "predict", fake_predict)
    train = make_noise_scheduler(DiffusionConfig(), latent=False)
    noise, gens = image_noise([0], (1, 4, 4))
    sample(None, make_sampler(train.config, "dpmsolver++"), noise, torch.tensor([0]), 2, 3.0, 10, gens, guidance_min_t=0.3)
    assert len(seen) == 10
    assert all(w == 3.0 for t, w in seen if t >= 300) and all(w == 1.0 for t, w in seen if t < 300)
    assert {w for _, w in seen} == {1.0, 3.0}
    seen.clear()
    sample(None, make_sampler(train.config, "dpmsolver++"), noise, torch.tensor([0]), 2, 3.0, 10, gens)
    assert {w for _, w in seen} == {3.0}  # 0: every step guided, as before


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_ddim_carries_on_the_noise_of_the_clipped_clean_image(kind):
    """A DDIM step from x_t must land on sqrt(a_prev) x0c + sqrt(1 - a_prev) eps(x_t, x0c), with x0c
    the clipped clean-image estimate, also when the network's estimate leaves the pixel range
    (guidance does): diffusers' own DDIM keeps the noise of the unclipped estimate there."""
    from diffusers import DDIMScheduler

    train = make_noise_scheduler(DiffusionConfig(prediction_type=kind), latent=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    x0 = 1.8 * torch.rand(2, 1, 4, 4, generator=g) * 2 - 1.8  # clean-image estimate, half of it out of range
    sch = make_sampler(train.config, "ddim")
    sch.set_timesteps(10)
    t, t_prev = sch.timesteps[3], sch.timesteps[4]
    a, a_prev = sch.alphas_cumprod[t], sch.alphas_cumprod[t_prev]
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    out = {"sample": x0, "epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
    x0c = x0.clamp(-1, 1)
    expected = a_prev.sqrt() * x0c + (1 - a_prev).sqrt() * (x - a.sqrt() * x0c) / (1 - a).sqrt()
    assert torch.allclose(sch.step(out, t, x).prev_sample, expected, atol=1e-4)
    plain = DDIMScheduler.from_config(train.config)
    plain.set_timesteps(10)
    assert not torch.allclose(plain.step(out, t, x).prev_sample, expected, atol=1e-2)
