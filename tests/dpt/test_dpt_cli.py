"""`dpt train-diffusion` / `generate` / `fid` end to end on tiny settings, resume, clean errors."""

import csv
import json

import pytest
from helpers.reads import only_read

import dpt.train_diffusion as td
from dpt.cli import build_parser, expand_overrides
from dpt.cli import main as dpt_main
from semivit.config.load import load_config
from semivit.runtime.loop import Trainer

TINY = [
    "data.name=digits",
    "data.image_size=8",
    "data.max_train=128",
    "diffusion.patch_size=2",
    "diffusion.hidden_size=32",
    "diffusion.depth=2",
    "diffusion.num_heads=2",
    "diffusion.batch_size=32",
    "diffusion.warmup_steps=2",
    "tensorboard=false",
]


def main(argv):
    """TINY holds diffusion settings for every command: each gets those it reads."""
    return dpt_main(only_read("dpt", argv, TINY))


def test_shortcuts_map_to_sections():
    assert expand_overrides("generate", ["model=D", "num_per_class=3", "seed=1", "generate.steps=4"]) == [
        "generate.model=D",
        "generate.num_per_class=3",
        "seed=1",
        "generate.steps=4",
    ]
    assert expand_overrides("fid", ["real=test", "features=inception"]) == ["fid.real=test", "fid.features=inception"]
    args = build_parser().parse_args(["train-diffusion", "--config", "c.yaml", "labels=true"])
    assert args.command == "train-diffusion" and args.overrides == ["labels=true"]


def test_train_generate_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-diffusion", *TINY, f"output_dir={run}", "labels=true", "epochs=2"]) == 0
    stage = run / "stage2"
    m = json.loads((stage / "metrics.json").read_text())
    assert m["label_source"] == "true" and m["num_classes"] == 10 and m["num_images"] == 128
    assert m["epochs"] == 2 and m["steps"] == 8 and m["ema_steps"] == 8  # 128 images / 32 per batch
    assert m["final_loss"] < 2.0
    for f in (
        "model/config.json",
        "model/diffusion_pytorch_model.safetensors",
        "model/scheduler_config.json",
        "model/dpt_meta.json",
        "config.yaml",
        "curves.png",
    ):
        assert (stage / f).is_file(), f
    assert list((stage / "samples").glob("*.png"))
    assert not (stage / "checkpoints").exists()
    meta = json.loads((stage / "model" / "dpt_meta.json").read_text())
    assert meta["null_label"] == 10 and meta["channels"] == 1 and meta["image_size"] == 8

    assert (
        main(
            [
                "generate",
                *TINY,
                f"output_dir={run}",
                "num_per_class=2",
                "steps=3",
                "sampler=ddim",
                "guidance_scale=1.5",
                "classes=3,7",
            ]
        )
        == 0
    )
    with open(run / "synthetic" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["class_name"] for r in rows} == {"3", "7"}
    assert {r["sampler"] for r in rows} == {"ddim"} and {r["guidance_scale"] for r in rows} == {"1.5"}
    assert (run / "synthetic" / "grid.png").is_file()


def test_train_diffusion_resume(tmp_path, monkeypatch):
    """A run interrupted after its epoch-1 checkpoint continues there: steps, EMA and history carry over."""
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, f"output_dir={run}", "diffusion.labels=true", "diffusion.epochs=3"])
    orig = Trainer.save_checkpoint

    def save_then_stop(self):
        orig(self)
        if self.state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        td.run_train_diffusion(cfg)
    assert (run / "stage2" / "checkpoints" / "epoch_1").is_dir()
    assert not (run / "stage2" / "model").exists()
    monkeypatch.setattr(Trainer, "save_checkpoint", orig)
    td.run_train_diffusion(cfg)
    m = json.loads((run / "stage2" / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 1 and m["epochs"] == 3
    assert m["steps"] == 12 and m["ema_steps"] == 12  # 4 steps per epoch, none repeated, EMA restored
    assert not (run / "stage2" / "checkpoints").exists()  # removed once the model is saved


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and match in err, err


def test_clean_errors(tmp_path, capsys):
    run = tmp_path / "run"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    one_line_error(capsys, ["train-diffusion", *TINY, f"output_dir={run}", f"labels={empty}"], "has no rows")
    one_line_error(capsys, ["train-diffusion", *TINY, f"output_dir={run}"], "pseudo-label stage")
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    one_line_error(capsys, ["generate", *TINY, f"model={not_model}"], "not a diffusers model folder")
    one_line_error(capsys, ["generate", *TINY, "sampler=euler"], "generate.sampler")
    one_line_error(
        capsys,
        ["fid", *TINY, f"output_dir={run}", "real=test", f"fake={not_model}", "features=inception"],
        "holds 0 images",
    )
    one_line_error(capsys, ["fid", *TINY, "real=test", "fake=test", "features=inception"], "fid.inception_weights")


def test_latent_space_with_local_vae(tmp_path):
    """diffusion.vae=DIR: training and generation run in the VAE's latent space."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=2,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train-diffusion",
                *TINY,
                f"output_dir={run}",
                "labels=true",
                "epochs=1",
                f"vae={tmp_path / 'vae'}",
                "diffusion.patch_size=1",
            ]
        )
        == 0
    )
    meta = json.loads((run / "stage2" / "model" / "dpt_meta.json").read_text())
    assert meta["model_channels"] == 2 and meta["model_size"] == 4 and meta["image_size"] == 8
    assert main(["generate", *TINY, f"output_dir={run}", "num_per_class=1", "steps=2"]) == 0
    from PIL import Image

    img = Image.open(next((run / "synthetic" / "0").glob("*.png")))
    assert img.size == (8, 8) and img.mode == "L"
    # the training images were encoded once into the run's latent cache; a rerun with other
    # training settings (or a resumed one) reads it instead of encoding again
    assert list((run / "cache" / "latents").glob("*.r0of1.mean.npy"))
    import dpt.diffusion.latents

    def no_encoding(*a, **k):
        raise AssertionError("encoded again although the cache is valid")

    real = dpt.diffusion.latents.encode_share
    dpt.diffusion.latents.encode_share = no_encoding
    try:
        args = ["train-diffusion", *TINY, f"output_dir={run}", "labels=true", "epochs=1", f"vae={tmp_path / 'vae'}"]
        assert main([*args, "diffusion.patch_size=1", "diffusion.lr=0.001"]) == 0
    finally:
        dpt.diffusion.latents.encode_share = real
