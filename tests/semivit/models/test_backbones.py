"""Any timm backbone in the classifier stages: a ResNet and a ConvNeXt through fine-tune -> semi ->
pseudo-label -> evaluate on configs/tiny.yaml (16 px images), the small-image stem, layer decay
where the model defines parameter groups, the probe head, and MAE's clean refusal of a CNN."""

import json
import logging
from pathlib import Path

import pytest
import torch

from semivit.config.load import load_config
from semivit.config.schema import ModelConfig, PretrainConfig
from semivit.errors import ConfigError, WeightsError
from semivit.models.classifier import classifier_head, create_classifier, load_classifier, load_encoder_weights
from semivit.models.mae import create_mae
from semivit.stages.common import make_optimizer

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.yaml"
# semi.tau=0: every pseudo-label passes, so the EMA teacher's targets and pseudo mixup are exercised
SHORT = ["finetune.epochs=1", "semi.steps_per_epoch=2", "semi.tau=0", "data.max_train=120", "data.max_test=40",
         "model.init=none"]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_cnn_runs_finetune_semi_pseudo_label_evaluate(tmp_path, name):
    from semivit.stages.evaluate import run_evaluate
    from semivit.stages.finetune import run_finetune
    from semivit.stages.pseudo_label import run_pseudo_label
    from semivit.stages.semi import run_semi

    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"model.name={name}", *SHORT])
    ft = run_finetune(cfg)
    semi = run_semi(cfg)
    csv = run_pseudo_label(cfg)
    metrics = run_evaluate(cfg, str(semi))
    for folder in (ft, semi):
        meta = json.loads((Path(folder) / "meta.json").read_text())
        assert meta["model"] == name and meta["stem"] == "auto"
        assert (Path(folder) / "model_ema.safetensors").is_file()
    rows = Path(csv).read_text().splitlines()
    assert len(rows) == 1 + 120  # header + one row per training image
    assert 0.0 <= metrics["top1_ema"] <= 100.0 and metrics["num_test"] == 40
    history = json.loads((Path(semi) / "history.json").read_text())
    assert history[-1]["mask_ratio"] == 1.0 and history[-1]["loss_u"] > 0
    # the folder rebuilds as the same architecture: same logits as the stage's own EMA weights
    model, _ = load_classifier(semi)
    assert type(model).__name__ == {"resnet18": "ResNet", "convnext_atto": "ConvNeXt"}[name]
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name,size", [("resnet18", 16), ("resnet18", 28), ("convnext_atto", 16), ("convnext_nano", 28)])
def test_small_stem_keeps_a_feature_map_at_small_sizes(name, size):
    model = create_classifier(ModelConfig(name=name, drop_path=0.0), 10, size, 1).eval()
    feats = model.forward_features(torch.zeros(2, 1, size, size))
    assert min(feats.shape[-2:]) >= 2  # total stride 8 instead of 32
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_native_convnext_stem_collapses_small_images_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"model.name='convnext_atto' cannot take 28-px.*model.stem=small"):
        create_classifier(ModelConfig(name="convnext_atto", stem="native"), 10, 28, 1)
    # at 64 px auto keeps timm's own stem (stride 32: 2x2 left)
    model = create_classifier(ModelConfig(name="convnext_atto", drop_path=0.0), 10, 64, 3).eval()
    assert model.stem[0].stride == (4, 4)
    with pytest.raises(ConfigError, match="model.stem=small is defined for"):
        create_classifier(ModelConfig(name="vit_micro_patch4", stem="small"), 10, 16, 1)


def test_cnn_pooling_choice_is_checked():
    with pytest.raises(ConfigError, match="global_pool='token'"):
        create_classifier(ModelConfig(name="resnet18", global_pool="token"), 10, 16, 1)
    model = create_classifier(ModelConfig(name="resnet18", global_pool="catavgmax"), 10, 16, 1)
    assert classifier_head(model).in_features == 1024


def test_mae_with_a_cnn_is_a_clean_config_error():
    with pytest.raises(ConfigError, match=r"stage 0 \(MAE pre-training\) needs a ViT; model.name='resnet18'.*model.init"):
        create_mae(ModelConfig(name="resnet18"), PretrainConfig(), 16, 1)
    with pytest.raises(ConfigError, match="needs a ViT; model.name='convnext_atto'"):
        create_mae(ModelConfig(name="convnext_atto"), PretrainConfig(), 16, 1)


def test_layer_decay_uses_timm_groups_where_defined_and_says_so(caplog):
    resnet = create_classifier(ModelConfig(name="resnet18"), 10, 16, 1)
    with caplog.at_level(logging.INFO, logger="semivit"):
        opt = make_optimizer(resnet, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g.get("lr_scale", 1.0) for g in opt.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.1  # stem far below the head
    assert "layer decay 0.5 over ResNet's parameter groups" in caplog.text

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="semivit"):
        opt = make_optimizer(Plain(), lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    assert "defines no parameter groups, plain AdamW" in caplog.text


def test_cnn_weights_load_with_head_skipped_and_stem_mismatch_refused(tmp_path):
    from semivit.files import save_weights

    src = create_classifier(ModelConfig(name="resnet18", drop_path=0.0), 5, 16, 1)
    save_weights(src.state_dict(), tmp_path / "w.safetensors")
    dst = create_classifier(ModelConfig(name="resnet18", drop_path=0.0), 10, 16, 1)
    report = load_encoder_weights(dst, tmp_path / "w.safetensors")
    assert report.skipped_shape == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    native = create_classifier(ModelConfig(name="resnet18", drop_path=0.0, stem="native"), 10, 64, 1)
    with pytest.raises(WeightsError, match="conv1.weight"):
        load_encoder_weights(native, tmp_path / "w.safetensors")


def test_probe_folds_into_a_convnext_head():
    from dpt.probe import Features, fold_into_head

    model = create_classifier(ModelConfig(name="convnext_atto", drop_path=0.0), 4, 16, 1).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        z = Features(model)(x)
    assert z.shape == (5, 320)
    mean, std = z.mean(0), z.std(0) + 0.1
    W, b = torch.randn(4, z.shape[1]), torch.randn(4)
    fold_into_head(model, W, b, mean, std)
    with torch.no_grad():
        assert torch.allclose(model(x), ((z - mean) / std) @ W.T + b, atol=1e-4)
