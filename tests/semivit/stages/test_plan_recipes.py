"""`plan` and the scaling rule against the published recipes: every ImageNet config, launched on 8,
16 or 32 processes, trains each stage at the global batch and learning rate its published command
gives (Semi-ViT's FINETUNE.md / SEMIVIT.md: global batch = --batch_size x --accum_iter x GPUs,
lr = --blr x global batch / 256; DiT: 256 images per step at a constant lr 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semivit.cli import main as semivit_main
from semivit.config.load import load_config
from semivit.config.scaling import apply_scaling, check_launch, layout_section
from semivit.config.schema import FinetuneConfig
from semivit.errors import ConfigError
from semivit.stages.plan import plan

CONFIGS = Path(__file__).resolve().parents[3] / "configs"

# stage -> (global batch, lr) from the published commands: --batch_size x [--accum_iter] x GPUs, --blr
FT_B = {"finetune": (64 * 8, 0.00005 * 512 / 256)}
PUBLISHED = {
    "imagenet_1pct_vit_base": {**FT_B, "semi": (16 * 8, 1e-3 * 128 / 256)},
    "imagenet_10pct_vit_base": {"finetune": (64 * 8, 0.00025 * 512 / 256), "semi": (16 * 8, 1e-3 * 128 / 256)},
    "imagenet_1pct_vit_large": {"finetune": (64 * 8, 0.001 * 512 / 256), "semi": (8 * 16, 1e-3 * 128 / 256)},
    "imagenet_10pct_vit_large": {"finetune": (64 * 8, 0.001 * 512 / 256), "semi": (8 * 16, 0.002 * 128 / 256)},
    "imagenet_1pct_vit_huge": {"finetune": (16 * 8, 0.01 * 128 / 256), "semi": (2 * 32, 0.005 * 64 / 256)},
    "imagenet_10pct_vit_huge": {"finetune": (16 * 8, 0.001 * 128 / 256), "semi": (2 * 2 * 32, 0.0025 * 128 / 256)},
    # the README's from-scratch recipe (ViT-B/10%: --batch_size 128 --blr 0.0001 on 8 GPUs) at ViT-S
    "imagenet_10pct_vit_small": {"finetune": (128 * 8, 0.0001 * 1024 / 256), "semi": (16 * 8, 1e-3 * 128 / 256)},
    "imagenet256_dit_xl2": {"diffusion": (256, 1e-4)},
    "imagenet256_dit_b2": {"diffusion": (256, 1e-4)},
    # DPT: stage 1 is Semi-ViT's ViT-B 1% recipe, stage 2 DiT-XL/2's
    "dpt_imagenet_1pct_vit_base": {**FT_B, "semi": (128, 5e-4), "diffusion": (256, 1e-4)},
    "dpt_imagenet_2shot_vit_base": {**FT_B, "semi": (128, 5e-4), "diffusion": (256, 1e-4)},
}


def test_the_table_covers_every_imagenet_config():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml") if "imagenet" in p.stem}
    assert shipped == set(PUBLISHED)


@pytest.mark.parametrize("processes", [8, 16, 32])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_plan_gives_the_published_global_batch_and_lr(name, processes):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    stages = {s["stage"]: s for s in plan(cfg, processes, diffusion=True)["stages"]}
    for stage, (batch, lr) in PUBLISHED[name].items():
        s = stages[stage]
        assert s["global_batch"] == batch, (stage, s)
        assert s["per_process"] * processes * s["accum"] == batch
        assert s["lr"] == pytest.approx(lr, rel=1e-9), (stage, s)


def test_only_the_accumulation_changes_with_the_gpu_count():
    cfg = load_config(CONFIGS / "imagenet_10pct_vit_huge.yaml")
    semi = {p: plan(cfg, p)["stages"][-1] for p in (8, 16, 32)}
    assert [(semi[p]["per_process"], semi[p]["accum"]) for p in (8, 16, 32)] == [(2, 8), (2, 4), (2, 2)]
    assert {semi[p]["steps"] for p in semi} == {semi[8]["steps"]}  # same optimizer steps, same images
    assert {semi[p]["images_seen"] for p in semi} == {semi[8]["images_seen"]}


def test_dpt_imagenet_configs_retrain_with_the_probe():
    for name in ("dpt_imagenet_1pct_vit_base", "dpt_imagenet_2shot_vit_base"):
        assert load_config(CONFIGS / f"{name}.yaml").retrain.mode == "probe"


def test_imagenet_dit_configs_keep_the_lr_constant():
    for name in ("imagenet256_dit_xl2", "imagenet256_dit_b2"):
        assert load_config(CONFIGS / f"{name}.yaml").diffusion.lr_schedule == "constant"


def test_an_unreachable_global_batch_is_a_config_error_before_anything_starts(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.global_batch'=512 cannot be split over 3 processes"):
        plan(load_config(CONFIGS / "imagenet_1pct_vit_base.yaml"), 3)
    monkeypatch.setenv("WORLD_SIZE", "3")  # the launch itself: the command refuses before its stage starts
    cfg = load_config(CONFIGS / "imagenet_1pct_vit_base.yaml")  # loads: another stage may fit this launch
    with pytest.raises(ConfigError, match="cannot be split over 3"):
        check_launch(cfg, ("finetune",))
    code = semivit_main(["finetune", "--config", str(CONFIGS / "imagenet_1pct_vit_base.yaml"), f"output_dir={tmp_path}"])
    assert code == 2 and not any(tmp_path.iterdir())  # one error line, exit 2, nothing written


def test_the_memory_cap_turns_into_accumulation():
    sec = FinetuneConfig(global_batch=512, blr=1e-3, max_device_batch=24)
    lay = layout_section(sec, "finetune", 4)  # 128 per process, at most 24 per device -> 8 x 16
    assert (lay.per_process, lay.accum, lay.global_batch) == (16, 8, 512)
    assert lay.lr == pytest.approx(1e-3 * 2)
    lay = layout_section(FinetuneConfig(global_batch=512), "finetune", 4)  # no cap: one micro-batch
    assert (lay.per_process, lay.accum) == (128, 1)


def test_unset_global_batch_leaves_per_process_settings_alone():
    cfg = load_config(CONFIGS / "tiny.yaml")
    before = (cfg.finetune.batch_size, cfg.finetune.grad_accum, cfg.finetune.lr)
    apply_scaling(cfg, 4)
    assert (cfg.finetune.batch_size, cfg.finetune.grad_accum, cfg.finetune.lr) == before
    # blr alone: the lr follows the launch's global batch, as main_finetune.py computes it
    lay = layout_section(FinetuneConfig(batch_size=32, grad_accum=2, blr=1e-3), "finetune", 4)
    assert lay.global_batch == 256 and lay.lr == pytest.approx(1e-3)


def test_the_launch_derives_the_per_process_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    cfg = load_config(CONFIGS / "imagenet_1pct_vit_large.yaml")
    assert (cfg.finetune.batch_size, cfg.finetune.grad_accum, cfg.finetune.lr) == (32, 1, pytest.approx(2e-3))
    assert (cfg.semi.batch_size, cfg.semi.grad_accum, cfg.semi.lr) == (8, 1, pytest.approx(5e-4))


def test_plan_command_prints_a_table_and_json(capsys):
    assert semivit_main(["plan", "--config", str(CONFIGS / "imagenet_1pct_vit_huge.yaml"), "--processes", "32"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "semi" in out and "global" in out
    assert semivit_main(["plan", "--config", str(CONFIGS / "imagenet_1pct_vit_huge.yaml"), "--processes", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    semi = data["stages"][-1]
    assert (semi["stage"], semi["global_batch"], semi["per_process"], semi["accum"]) == ("semi", 64, 2, 1)
    assert semi["images_seen"] == semi["steps"] * 64 * 6  # labeled + mu x unlabeled


def test_plan_estimates_time_from_the_throughput_benchmark(tmp_path):
    bench = tmp_path / "throughput.json"
    bench.write_text(json.dumps({"device": "GPU-X", "small": False, "rows": [{"name": "vit_finetune", "images_per_s": 1000.0}]}))
    cfg = load_config(CONFIGS / "imagenet_1pct_vit_base.yaml")
    ft = plan(cfg, 8, throughput=bench)["stages"][0]
    assert ft["hours"] == pytest.approx(ft["images_seen"] / (1000.0 * 8) / 3600)
    assert plan(cfg, 8, throughput=tmp_path / "none.json")["stages"][0]["hours"] is None
