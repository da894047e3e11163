"""Settings, label splits and checkpoint loading."""

import numpy as np
import pytest
import torch

from semivit.config.load import load_config, read_saved_config, save_config
from semivit.data.sources import build_data
from semivit.data.split import load_label_split, make_split, save_label_split
from semivit.errors import ConfigError, DataError
from semivit.files import save_weights
from semivit.models.classifier import create_classifier, load_encoder_weights
from semivit.models.mae import create_mae


def test_yaml_then_overrides(tmp_path):
    cfg = load_config("configs/mnist5k.yaml", ["output_dir=runs/a", "data.labels_per_class=4", "seed=1", "semi.tau=0.9"])
    assert (cfg.output_dir, cfg.data.labels_per_class, cfg.seed, cfg.semi.tau) == ("runs/a", 4, 1, 0.9)
    save_config(cfg, tmp_path / "c.yaml")
    again = read_saved_config(tmp_path / "c.yaml")
    assert again.semi.tau == 0.9 and again.output_dir == "runs/a"


def test_unknown_setting_suggests_near_one():
    with pytest.raises(ConfigError, match="semi.lambda_x.*lambda_u"):
        load_config(None, ["semi.lambda_x=2"])
    with pytest.raises(ConfigError, match="semi.teacher"):
        load_config(None, ["semi.teacher=mean"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["semi.mu=many"])


def test_split_is_deterministic_and_per_class():
    cfg = load_config(None, ["data.name=digits", "data.labels_per_class=3"])
    train = build_data(cfg.data).train
    a, b = make_split(cfg.data, train, seed=5), make_split(cfg.data, train, seed=5)
    c = make_split(cfg.data, train, seed=6)
    assert np.array_equal(a.labeled, b.labeled) and not np.array_equal(a.labeled, c.labeled)
    assert np.bincount(train.targets[a.labeled]).tolist() == [3] * 10
    assert len(np.intersect1d(a.labeled, a.unlabeled)) == 0
    assert len(a.labeled) + len(a.unlabeled) == len(train)


def test_split_errors(tmp_path):
    cfg = load_config(None, ["data.name=digits", "data.max_train=50", "data.labels_per_class=20"])
    train = build_data(cfg.data).train
    with pytest.raises(DataError, match="labels_per_class"):
        make_split(cfg.data, train, 0)
    bad = tmp_path / "split.csv"
    bad.write_text("index,path\n3,\n999,\n")
    with pytest.raises(DataError, match="out of range"):
        load_label_split(bad, train)
    good = tmp_path / "good.csv"
    save_label_split(good, np.array([1, 4, 7]), train)
    assert load_label_split(good, train).tolist() == [1, 4, 7]


class NotATensor:
    """Unpickling this would run code from the file; weights_only loading must refuse it."""


def _mcfg(name="vit_micro_patch4"):
    return load_config(None, [f"model.name={name}"]).model


def test_mae_encoder_loads_into_classifier_with_other_image_size(tmp_path):
    cfg = load_config(None, [])
    mae = create_mae(_mcfg(), cfg.pretrain, image_size=16, in_chans=1)
    save_weights(mae.encoder.state_dict(), tmp_path / "encoder.safetensors")
    clf = create_classifier(_mcfg(), num_classes=10, image_size=24, in_chans=1)  # 4x4 -> 6x6 grid
    report = load_encoder_weights(clf, tmp_path / "encoder.safetensors")
    assert "pos_embed" in report.loaded and clf.pos_embed.shape[1] == 1 + 36
    assert torch.equal(clf.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    assert "head.weight" in report.missing


def test_prefixed_torch_checkpoints_and_mismatch(tmp_path):
    src = create_classifier(_mcfg(), num_classes=10, image_size=16, in_chans=1)
    # MAE-style {"model": ...} and DINO-style "module.backbone." prefixes, plain torch files
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "mae.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "dino.pth")
    for f in ("mae.pth", "dino.pth"):
        dst = create_classifier(_mcfg(), num_classes=10, image_size=16, in_chans=1)
        load_encoder_weights(dst, tmp_path / f, strict_head=True)
        assert torch.equal(dst.head.weight, src.head.weight)
    other = create_classifier(_mcfg("vit_mini_patch4"), num_classes=10, image_size=16, in_chans=1)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder_weights(other, tmp_path / "mae.pth")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pth")
    clf = create_classifier(_mcfg(), num_classes=10, image_size=16, in_chans=1)
    with pytest.raises(ValueError, match="weights_only"):
        load_encoder_weights(clf, tmp_path / "evil.pth")
