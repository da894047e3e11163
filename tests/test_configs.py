"""Every shipped config loads (a misspelt key fails here, not hours into a GPU job), and
``base:`` layering works."""

from pathlib import Path

import pytest

from semivit.config.load import load_config
from semivit.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.output_dir


def test_base_layers_apply_in_order_and_file_wins(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\nsemi:\n  tau: 0.5\n  mu: 3\n")
    (tmp_path / "b.yaml").write_text("semi:\n  mu: 4\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\nsemi:\n  tau: 0.9\n")
    cfg = load_config(tmp_path / "c.yaml", ["seed=7"])
    assert (cfg.seed, cfg.semi.tau, cfg.semi.mu) == (7, 0.9, 4)


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "m.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "m.yaml")


def test_dpt_imagenet_config_keeps_the_classifier_resolution():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "dpt_imagenet_2shot_vit_base.yaml")
    assert cfg.data.image_size == 224 and cfg.diffusion.image_size == 256
    assert cfg.data.labels_per_class == 2 and cfg.diffusion.p_uncond == 0.15
