"""Initialisation as the published code does it: the classifier head of MAE / Semi-ViT fine-tuning
(main_finetune.py: trunc_normal_(head.weight, std=2e-5), zero bias) and the semi stage's start
(main_semi.py --super_finetune: the student from the checkpoint's model, the teacher (EMA) from
its model_ema)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from semivit.config.schema import Config
from semivit.files import save_weights
from semivit.models.classifier import HEAD_INIT_STD, classifier_meta, create_classifier, save_classifier
from semivit.runtime.layout import EMA_WEIGHTS, WEIGHTS
from semivit.stages.common import build_classifier
from semivit.stages.semi import build_student_teacher, semi_start_files

K = 10


def _cfg() -> Config:
    cfg = Config()
    cfg.model.name = "vit_micro_patch4"
    cfg.data.image_size = 16
    return cfg


def _bundle():
    return SimpleNamespace(num_classes=K, channels=1, classes=[str(i) for i in range(K)], mean=[0.5], std=[0.5])


def _net(cfg, seed: int):
    torch.manual_seed(seed)
    return create_classifier(cfg.model, K, cfg.data.image_size, 1)


def test_a_new_head_on_loaded_encoder_weights_gets_maes_init(tmp_path):
    cfg = _cfg()
    encoder = {k: v for k, v in _net(cfg, 1).state_dict().items() if not k.startswith("head")}
    save_weights(encoder, tmp_path / "encoder.safetensors")
    torch.manual_seed(0)
    model = build_classifier(cfg, _bundle(), str(tmp_path / "encoder.safetensors"))
    w, b = model.head.weight.detach(), model.head.bias.detach()
    assert torch.all(b == 0)
    assert w.abs().max() <= 2 * HEAD_INIT_STD + 1e-12  # truncated at 2 std
    assert 0.5 * HEAD_INIT_STD < w.std() < 1.5 * HEAD_INIT_STD  # std 2e-5, not timm's 0.02-ish default
    assert torch.equal(model.blocks[0].attn.qkv.weight, encoder["blocks.0.attn.qkv.weight"])  # the encoder loaded


def test_a_loaded_head_is_kept(tmp_path):
    cfg = _cfg()
    net = _net(cfg, 2)
    save_classifier(tmp_path / "clf", net, net, classifier_meta(cfg, _bundle()))
    model = build_classifier(cfg, _bundle(), str(tmp_path / "clf" / WEIGHTS), strict_head=True)
    assert torch.equal(model.head.weight, net.head.weight)


def test_semi_starts_the_student_from_the_model_and_the_teacher_from_its_ema(tmp_path):
    cfg = _cfg()
    student, teacher = _net(cfg, 3), _net(cfg, 4)
    folder = tmp_path / "finetune"
    save_classifier(folder, student, teacher, classifier_meta(cfg, _bundle()))
    s_file, t_file = semi_start_files(cfg, str(folder))
    assert (s_file.name, t_file.name) == (WEIGHTS, EMA_WEIGHTS)
    model, ema = build_student_teacher(cfg, _bundle(), s_file, t_file)
    for name, p in model.state_dict().items():
        assert torch.equal(p, student.state_dict()[name]), name
    for name, p in ema.module.state_dict().items():
        assert torch.equal(p, teacher.state_dict()[name]), name
    assert not torch.equal(model.head.weight, ema.module.head.weight)


def test_a_single_weights_file_starts_both_from_it(tmp_path):
    cfg = _cfg()
    net = _net(cfg, 5)
    save_classifier(tmp_path / "clf", net, None, classifier_meta(cfg, _bundle()))
    s_file, t_file = semi_start_files(cfg, str(tmp_path / "clf"))
    assert s_file == t_file
    model, ema = build_student_teacher(cfg, _bundle(), s_file, t_file)
    assert torch.equal(ema.module.head.weight, model.head.weight)


def test_semi_start_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="semivit finetune"):
        semi_start_files(_cfg(), str(tmp_path / "nowhere"))
