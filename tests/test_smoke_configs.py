"""Smoke mode: ``apply_smoke`` keeps what decides whether a config works and shrinks only the work;
the stand-ins for user files load through the project's own loaders; and every shipped config
runs end to end with ``smoke=true`` (``python -m dpt run``), writing every stage's files.

The configs with very big models (ViT-L/H, DiT-XL/2) are marked ``slow`` and left out of the
default run (``bash scripts/test.sh -m slow`` runs them).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semivit.config.load import load_config
from semivit.config.schema import Config, to_dict
from semivit.config.smoke import (
    SMOKE_BATCH,
    SMOKE_GENERATE_PER_CLASS,
    SMOKE_MAX_ACCUM,
    SMOKE_SAMPLER_STEPS,
    SMOKE_TEST_PER_CLASS,
    SMOKE_UNLABELED_PER_CLASS,
    apply_smoke,
    smoke_overrides,
    train_images_per_class,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/accelerate/ holds launcher files
# data sets the project ships (no data.root): their configs keep their own data
BUNDLED_DATA = ("mnist5k", "digits")
# stage-2 configs that leave diffusion.vae for the user to fill in: without a VAE their DiT would
# run on 256x256 pixels, a model nobody means to train
LATENT_CONFIGS = {"imagenet256_dit_b2", "imagenet256_dit_xl2"}
# ViT-L/H classifiers or a DiT-XL/2 generator: minutes and many GB on a CPU
SLOW_CONFIGS = {
    "dpt_imagenet_1pct_vit_base",  # DiT-XL/2
    "dpt_imagenet_2shot_vit_base",  # DiT-XL/2
    "imagenet256_dit_xl2",
    "imagenet_10pct_vit_huge",
    "imagenet_10pct_vit_large",
    "imagenet_1pct_vit_huge",
    "imagenet_1pct_vit_large",
    # ViT-S/B at 224 px with the default pixel-space DiT at 224 px and a judge: several CPU minutes
    # each; CI keeps one pixel-space bf16 DPT config (CIFAR-10) and one latent-space one with the
    # Inception path (imagenet256_dit_b2)
    "imagenet_1pct_vit_base",
    "imagenet_10pct_vit_base",
    "imagenet_10pct_vit_small",
}
SMOKE_TIMEOUT_S = 900
SLOW_SMOKE_TIMEOUT_S = 3 * 3600


def _config_param(path: Path):
    marks = [pytest.mark.slow] if path.stem in SLOW_CONFIGS else []
    return pytest.param(path, id=path.stem, marks=marks)


# --------------------------------------------------------------------------------------------
# apply_smoke
# --------------------------------------------------------------------------------------------


def _smoke(path: Path, *overrides: str) -> tuple[Config, Config]:
    """The config as loaded with smoke off, and apply_smoke of it with smoke on."""
    cfg = load_config(path, ["smoke=false", *overrides])
    on = dataclasses.replace(cfg, smoke=True)
    return cfg, apply_smoke(on)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_apply_smoke_keeps_models_resolution_precision_and_files(path):
    cfg, smoke = _smoke(path)
    assert smoke.model == cfg.model
    kept = {
        "data": ("name", "root", "image_size", "channels", "transforms", "hflip", "randaug_magnitude", "random_erasing"),
        "pretrain": ("amp", "mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss"),
        "finetune": ("amp", "lr", "layer_decay", "mixup", "cutmix", "ema_decay"),
        "semi": ("amp", "tau", "lambda_u", "teacher", "ema_decay", "pseudo_mixup", "dist_align", "lr"),
        "diffusion": (
            "model", "image_size", "patch_size", "hidden_size", "depth", "num_heads", "unet_channels", "vae",
            "labels", "p_uncond", "num_train_timesteps", "beta_schedule", "prediction_type", "amp", "ema_decay",
        ),
        "generate": ("sampler", "guidance_scale", "seed", "classes"),
        "fid": ("features", "inception_weights", "classifier", "real"),
        "retrain": ("mode", "source", "filter_conf", "init", "synthetic_ratio", "synthetic_only", "probe_l2"),
    }
    for section, keys in kept.items():
        for key in keys:
            assert getattr(getattr(smoke, section), key) == getattr(getattr(cfg, section), key), f"{section}.{key}"
    for section in ("pretrain", "finetune", "semi", "diffusion"):  # the accumulation path (a derived one capped)
        before, after = getattr(cfg, section), getattr(smoke, section)
        expected = min(before.grad_accum, SMOKE_MAX_ACCUM) if before.global_batch else before.grad_accum
        assert after.grad_accum == expected and (after.grad_accum > 1) == (before.grad_accum > 1), section
    assert (smoke.seed, smoke.name, smoke.pipeline.judge) == (cfg.seed, cfg.name, cfg.pipeline.judge)
    # never the real run's folder
    assert smoke.output_dir == cfg.output_dir.rstrip("/") + "_smoke"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_apply_smoke_shrinks_the_work(path):
    _, s = _smoke(path)
    for section in (s.pretrain, s.finetune, s.semi, s.diffusion):
        assert section.epochs == 1 and 1 <= section.batch_size <= 2
    assert s.pipeline.judge_epochs == 1
    assert s.semi.mu <= 2 and s.semi.steps_per_epoch == 2
    assert s.finetune.eval_every == 0 and s.semi.eval_every == 0
    # warm-up fits in the single epoch, so warm-up and cosine both run
    assert all(sec.warmup_epochs < 1 for sec in (s.pretrain, s.finetune, s.semi))
    assert s.diffusion.warmup_steps <= 1 and s.diffusion.sample_every == 0 and s.diffusion.checkpoint_every >= 1
    assert s.data.max_test_per_class == SMOKE_TEST_PER_CLASS and s.data.num_workers == 0
    assert (s.generate.num_per_class, s.generate.steps) == (SMOKE_GENERATE_PER_CLASS, SMOKE_SAMPLER_STEPS)
    assert s.generate.batch_size <= 2 and s.fid.batch_size <= 2 and s.pseudo_label.batch_size <= 2
    assert s.retrain.synthetic_per_class == 0 and s.stop_after_epoch == 0


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["data.labels_per_class=1"], 1 + SMOKE_UNLABELED_PER_CLASS),
        (["data.labels_per_class=4"], 4 + SMOKE_UNLABELED_PER_CLASS),
        (["data.label_percent=1"], 1 + SMOKE_UNLABELED_PER_CLASS),  # at least one label per class
        (["data.label_percent=10"], 1 + SMOKE_UNLABELED_PER_CLASS),
        (["data.label_percent=50"], 5),  # round(2.5) = 2 labeled + 3 unlabeled
    ],
)
def test_every_class_keeps_unlabeled_images(labels, expected):
    from semivit.data.split import draw_label_split

    _, s = _smoke(ROOT / "configs" / "tiny.yaml", *labels)
    n = s.data.max_train_per_class
    assert n == expected == train_images_per_class(s.data)
    targets = torch.arange(3).repeat_interleave(n).numpy()  # 3 classes of n images each
    labeled = draw_label_split(targets, 3, 0, s.data.labels_per_class, s.data.label_percent)
    for c in range(3):
        assert n - (targets[labeled] == c).sum() >= SMOKE_UNLABELED_PER_CLASS


def test_a_label_csv_becomes_a_per_class_count():
    _, s = _smoke(ROOT / "configs" / "imagenet_10pct_vit_base.yaml", "data.label_csv=indexes/train_10p_index.csv")
    assert s.data.label_csv == "" and s.data.max_train_per_class >= 1 + SMOKE_UNLABELED_PER_CLASS


def test_a_larger_cap_from_the_command_line_is_kept():
    _, s = _smoke(ROOT / "configs" / "tiny.yaml", "data.max_train_per_class=20", "data.max_test_per_class=5")
    assert (s.data.max_train_per_class, s.data.max_test_per_class) == (20, 5)


def test_apply_smoke_is_a_pure_idempotent_copy():
    cfg = load_config(ROOT / "configs" / "dpt_cifar10_4labels.yaml", ["smoke=false"])
    on = dataclasses.replace(cfg, smoke=True)
    before = to_dict(on)
    once = apply_smoke(on)
    assert to_dict(on) == before  # the input is untouched
    assert to_dict(apply_smoke(once)) == to_dict(once)
    assert once is not on and once.data is not on.data
    off = apply_smoke(cfg)
    assert off is not cfg and to_dict(off) == to_dict(cfg)  # smoke off: an equal copy


def test_smoke_overrides_reproduce_apply_smoke():
    path = ROOT / "configs" / "imagenet_1pct_vit_base.yaml"
    cfg = dataclasses.replace(load_config(path, ["smoke=false"]), smoke=True)
    pairs = smoke_overrides(cfg)
    assert "finetune.epochs=1" in pairs and f"semi.batch_size={SMOKE_BATCH}" in pairs
    assert not [p for p in pairs if p.startswith(("model.", "diffusion.vae", "fid.inception"))]
    by_hand = load_config(path, ["smoke=false", *pairs])
    assert to_dict(by_hand) == to_dict(dataclasses.replace(apply_smoke(cfg), smoke=False))


# --------------------------------------------------------------------------------------------
# The stand-ins load through the project's loaders
# --------------------------------------------------------------------------------------------


def test_standin_imagefolder_is_an_imagefolder_data_set(rgb_imagefolder):
    from semivit.config.schema import DataConfig
    from semivit.data.sources import build_data

    bundle = build_data(DataConfig(name="imagefolder", root=str(rgb_imagefolder), image_size=48))
    assert bundle.classes == ["a", "b", "c"] and bundle.channels == 3
    counts = torch.bincount(torch.as_tensor(bundle.train.targets)).tolist()
    assert counts == [8, 8, 8] and len(bundle.test) == 6
    a, b = (torch.as_tensor(list(bundle.train.load(i).getdata()), dtype=torch.float32) for i in (0, 8))
    assert a.mean(0).sub(b.mean(0)).abs().max() > 20  # classes differ in colour


def test_standin_vae_loads_as_the_sd_vae(sd_vae):
    from dpt.diffusion.codec import Codec, load_vae, model_space

    vae = load_vae(str(sd_vae))
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert model_space(vae, 3, 256) == (4, 32)
    codec = Codec(vae)
    assert codec.scale == pytest.approx(0.18215)
    z = codec.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.shape == (1, 4, 8, 8) and codec.decode(z).shape == (1, 3, 64, 64)


def test_standin_inception_gives_2048_features(inception_weights):
    from dpt.fid import InceptionFeatures, feature_network

    assert torch.load(inception_weights, map_location="cpu", weights_only=True)  # a plain state dict
    net = InceptionFeatures(str(inception_weights))
    feats = net(torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8))
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and feats.std() > 1e-3
    cfg = load_config(None, ["fid.features=inception", f"fid.inception_weights={inception_weights}"])
    assert feature_network(cfg).num_features == 2048


def test_standin_mae_checkpoint_loads_into_the_classifier(mae_checkpoint):
    from semivit.config.schema import ModelConfig
    from semivit.models.classifier import create_classifier, load_encoder_weights

    model = create_classifier(ModelConfig(name="vit_small_patch16_224"), 3, 224, 3)
    report = load_encoder_weights(model, mae_checkpoint("vit_small_patch16_224"))
    assert len(report.loaded) > 100
    assert not [k for k in report.missing if not k.startswith(("head", "fc_norm"))]
    assert not [k for k in report.unexpected if k.startswith(("decoder", "mask_token"))]  # dropped, not unexpected


# --------------------------------------------------------------------------------------------
# Every shipped config, end to end, in smoke mode
# --------------------------------------------------------------------------------------------


def smoke_settings(path: Path, out: Path, images: Path, vae, inception, mae) -> list[str]:
    """The command-line settings of a smoke run of ``path``: the stand-ins in place of the files
    the config expects from the user (data, VAE, Inception weights, MAE weights)."""
    cfg = load_config(path, ["smoke=false"])
    settings = ["smoke=true", f"output_dir={out}"]
    if cfg.data.name not in BUNDLED_DATA:
        settings += ["data.name=imagefolder", f"data.root={images}"]
    if cfg.model.init not in ("", "auto", "none"):
        settings.append(f"model.init={mae(cfg.model.name, cfg.data.image_size)}")
    if cfg.diffusion.vae or path.stem in LATENT_CONFIGS:
        settings.append(f"diffusion.vae={vae()}")
    if cfg.fid.features == "inception":
        settings.append(f"fid.inception_weights={inception()}")
    return settings


def run_smoke(path: Path, settings: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dpt", "run", "--config", str(path), *settings]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_smoke_run(cfg: Config) -> None:
    """Every enabled stage's result file and folder, the report, and a synthetic set of the smoke size."""
    from dpt.pipeline import STAGES

    run = cfg.run_dir
    for stage in STAGES:
        if stage.enabled(cfg):
            assert (run / stage.marker).is_file(), stage.marker
            assert not stage.folder or (run / stage.folder).is_dir(), stage.folder
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fid"] is not None and summary["fid_features"]
    assert "Semi-ViT" in (run / "report.md").read_text()
    with open(run / "synthetic" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = json.loads((run / "stage2" / "model" / "dpt_meta.json").read_text())["classes"]
    assert len(rows) == len(classes) * SMOKE_GENERATE_PER_CLASS
    assert {r["steps"] for r in rows} == {str(SMOKE_SAMPLER_STEPS)}


@pytest.mark.parametrize("path", [_config_param(p) for p in CONFIGS])
def test_shipped_config_runs_end_to_end_in_smoke_mode(
    path, tmp_path, rgb_imagefolder, request, mae_checkpoint
):
    # the VAE and Inception stand-ins are made only for the configs that use them
    settings = smoke_settings(
        path,
        tmp_path / "run",
        rgb_imagefolder,
        vae=lambda: request.getfixturevalue("sd_vae"),
        inception=lambda: request.getfixturevalue("inception_weights"),
        mae=mae_checkpoint,
    )
    timeout = SLOW_SMOKE_TIMEOUT_S if path.stem in SLOW_CONFIGS else SMOKE_TIMEOUT_S
    proc = run_smoke(path, settings, timeout)
    assert proc.returncode == 0, f"{' '.join(settings)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    check_smoke_run(load_config(path, settings))


def test_smoke_never_writes_into_a_real_runs_folder():
    from semivit.config.smoke import smoke_output_dir

    assert smoke_output_dir("runs/cifar") == "runs/cifar_smoke"
    assert smoke_output_dir("runs/cifar_smoke") == "runs/cifar_smoke"
    assert smoke_output_dir("runs/smoke/") == "runs/smoke"
