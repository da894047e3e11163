"""Stage 3's modes (semi, supervised, probe) and sources of extra images (synthetic, pseudo-real,
real, none), the confidence filter and the probe's logistic regression, on configs/tiny.yaml."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpt.pipeline import plan, run_pipeline
from dpt.probe import L2_GRID, choose_l2, fit_logreg, fold_into_head, stratified_folds
from dpt.retrain import per_class_draw, run_retrain
from semivit.config.load import load_config
from semivit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("modes") / "run"
    run_pipeline(load_config(TINY, [f"output_dir={run}"]))
    return run


def retrain(run: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(TINY, [f"output_dir={run}", *overrides])
    run_retrain(cfg, out_dir=out)
    return json.loads((out / "metrics.json").read_text())


def test_logistic_regression_reaches_its_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(120, generator=g) > 0).long() + (x[:, 1] > 1).long()
    l2 = 1e-2
    W, b = fit_logreg(x, y, 3, l2)
    # first-order optimality of mean cross-entropy + l2/2 |W|^2
    p = torch.softmax(x.double() @ W.double().T + b.double(), 1)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    grad_w = (p - onehot).T @ x.double() / len(y) + l2 * W.double()
    grad_b = (p - onehot).mean(0)
    assert grad_w.abs().max() < 1e-4 and grad_b.abs().max() < 1e-4
    assert (((x @ W.T + b).argmax(1)) == y).float().mean() > 0.7
    # a larger penalty shrinks the weights
    W_big, _ = fit_logreg(x, y, 3, 1.0)
    assert W_big.norm() < 0.5 * W.norm()


def test_probe_folded_into_the_vit_head_gives_the_same_logits():
    from semivit.config.schema import ModelConfig
    from semivit.models.classifier import create_classifier

    vit = create_classifier(ModelConfig(name="vit_micro_patch4"), 4, 16, 1).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        z = vit.forward_head(vit.forward_features(x), pre_logits=True)
    mean, std = z.mean(0), z.std(0) + 0.1
    W, b = torch.randn(4, z.shape[1]), torch.randn(4)
    fold_into_head(vit, W, b, mean, std)
    with torch.no_grad():
        assert torch.allclose(vit(x), ((z - mean) / std) @ W.T + b, atol=1e-4)


def test_folds_are_stratified_and_l2_is_chosen_from_the_grid():
    labels = np.repeat(np.arange(4), 5)
    folds = stratified_folds(labels, 5, seed=0)
    for f in range(5):  # every fold holds one image of every class
        assert sorted(labels[folds == f].tolist()) == [0, 1, 2, 3]
    one_each = stratified_folds(np.arange(10), 5, seed=0)  # 1 image per class: 2 per fold
    assert np.bincount(one_each).tolist() == [2] * 5
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 8, generator=g) * 3
    x = centers[labels] + torch.randn(20, 8, generator=g)
    y = torch.as_tensor(labels)
    xe = centers.repeat(10, 1) + torch.randn(40, 8, generator=g)
    ye = torch.arange(4).repeat(10)
    l2, scores = choose_l2(x, y, xe, ye, 4, 5, 0, extra_only=False)
    assert l2 in L2_GRID and len(scores) == len(L2_GRID)
    assert max(s["heldout_acc"] for s in scores) >= 90
    l2_only, _ = choose_l2(x, y, xe, ye, 4, 5, 0, extra_only=True)
    assert l2_only in L2_GRID


def test_per_class_draw_takes_k_of_each_class_and_says_when_the_filter_leaves_fewer(caplog):
    labels = np.repeat(np.arange(3), 6)
    keep = np.ones(18, dtype=bool)
    chosen = per_class_draw(labels, keep, 4, seed=0, what="pool", strict=True)
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert np.array_equal(chosen, per_class_draw(labels, keep, 4, seed=0, what="pool", strict=True))
    keep[:5] = False  # class 0 keeps one image
    with pytest.raises(Exception, match="fewer than the 4"):
        per_class_draw(labels, keep, 4, seed=0, what="pool", strict=True)
    chosen = per_class_draw(labels, keep, 4, seed=0, what="pool", strict=False)
    assert np.bincount(labels[chosen]).tolist() == [1, 4, 4]
    assert "fewer than 4 images left" in caplog.text
    assert len(per_class_draw(labels, keep, 0, seed=0, what="pool", strict=True)) == 13
    caplog.clear()  # a class with no image at all is named too
    chosen = per_class_draw(labels, labels != 2, 4, seed=0, what="pool", strict=False, num_classes=3)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [4, 4, 0] and "2: 0" in caplog.text


def test_every_source_in_probe_mode(tiny_run, tmp_path):
    none = retrain(tiny_run, tmp_path / "none", "retrain.mode=probe", "retrain.source=none", "retrain.init=stage0")
    assert none["mode"] == "probe" and none["source"] == "none" and none["num_extra"] == 0
    assert none["num_labeled"] == 20 and none["probe_l2"] in L2_GRID and len(none["probe_l2_scores"]) == len(L2_GRID)
    assert (tmp_path / "none" / "probe_l2.png").stat().st_size > 0

    pseudo = retrain(
        tiny_run, tmp_path / "pseudo", "retrain.mode=probe", "retrain.source=pseudo-real", "retrain.synthetic_per_class=3",
        "retrain.init=stage0", "retrain.probe_l2=0.01",
    )
    # at most 3 a class: the tiny teacher's pseudo-labels favour a few classes
    assert max(pseudo["extra_per_class"]) <= 3 and pseudo["num_extra"] == sum(pseudo["extra_per_class"]) > 0
    assert pseudo["probe_l2"] == 0.01 and pseudo["probe_l2_scores"] == []
    assert 0 <= pseudo["extra_label_acc"] <= 100

    real = retrain(tiny_run, tmp_path / "real", "retrain.mode=probe", "retrain.source=real", "retrain.synthetic_per_class=3")
    assert real["extra_per_class"] == [3] * 10 and "extra_label_acc" not in real

    synthetic = retrain(
        tiny_run, tmp_path / "syn", "retrain.mode=probe", "retrain.synthetic_per_class=2", "retrain.filter_conf=0.05",
    )
    assert synthetic["source"] == "synthetic" and 0 <= synthetic["filter_kept"] <= 1
    assert all(n <= 2 for n in synthetic["extra_per_class"])

    cas = retrain(tiny_run, tmp_path / "cas", "retrain.mode=probe", "retrain.synthetic_only=true", "retrain.init=stage0")
    assert cas["num_labeled"] == 0 and cas["num_extra"] == 40


def test_probe_result_is_a_classifier_folder_that_evaluate_reads(tiny_run, tmp_path):
    from semivit.stages.evaluate import run_evaluate

    m = retrain(tiny_run, tmp_path / "probe", "retrain.mode=probe", "retrain.source=none", "retrain.probe_l2=0.1")
    again = run_evaluate(load_config(TINY, [f"output_dir={tmp_path}"]), str(tmp_path / "probe"))
    assert again["top1"] == pytest.approx(m["top1"], abs=1e-6)


def test_supervised_mode_keeps_the_steps_of_its_k0_control(tiny_run, tmp_path):
    none = retrain(tiny_run, tmp_path / "none", "retrain.mode=supervised", "retrain.source=none", "retrain.init=stage0")
    syn = retrain(
        tiny_run, tmp_path / "syn", "retrain.mode=supervised", "retrain.synthetic_per_class=4", "retrain.init=stage0",
    )
    assert none["num_extra"] == 0 and syn["num_extra"] == 40 and syn["extra_ratio"] == 0.5
    steps = [json.loads((tmp_path / k / "history.json").read_text())[-1]["step"] for k in ("none", "syn")]
    assert steps[0] == steps[1] > 0
    assert none["mode"] == syn["mode"] == "supervised"


def test_semi_mode_with_pseudo_real_images(tiny_run, tmp_path):
    m = retrain(tiny_run, tmp_path / "semi", "retrain.source=pseudo-real", "retrain.synthetic_per_class=2")
    assert m["mode"] == "semi" and m["num_synthetic"] == m["num_extra"] > 0 and m["num_unlabeled"] > 0
    assert max(m["extra_per_class"]) <= 2


def test_cli_short_keys_and_a_changed_mode_reruns_only_stage_3(tiny_run):
    from dpt.cli import main

    assert main(["retrain", "--config", str(TINY), f"output_dir={tiny_run}", "mode=probe", "source=none", "probe_l2=1"]) == 0
    assert json.loads((tiny_run / "stage3" / "metrics.json").read_text())["mode"] == "probe"
    cfg = load_config(TINY, [f"output_dir={tiny_run}", "retrain.mode=probe", "retrain.source=none", "retrain.probe_l2=1"])
    assert [s.name for s, _ in plan(cfg)] == ["retrain", "report"]  # only stage 3 and the report depend on it
    run_pipeline(cfg)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["dpt_mode"] == "probe" and summary["dpt_source"] == "none"
    assert plan(cfg) == []
    back = load_config(TINY, [f"output_dir={tiny_run}"])
    assert [s.name for s, _ in plan(back)] == ["retrain", "report"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["retrain.source=none", "retrain.synthetic_only=true"], "retrain.source"),
        (["retrain.source=real", "retrain.filter_conf=0.5"], "retrain.filter_conf"),
        (["retrain.probe_l2=strong"], "retrain.probe_l2"),
        (["retrain.probe_l2=-1"], "retrain.probe_l2"),
        (["retrain.mode=linear"], "retrain.mode"),
        (["retrain.source=fake"], "retrain.source"),
        (["retrain.filter_conf=1.5"], "retrain.filter_conf"),
    ],
)
def test_bad_retrain_settings_fail_with_the_setting_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)


def test_probe_needs_no_synthetic_ratio_and_pseudo_real_needs_pseudo_labels(tiny_run, tmp_path):
    load_config(TINY, ["retrain.mode=probe", "retrain.synthetic_ratio=1"])  # the probe mixes no batches
    encoder = tiny_run / "stage0" / "encoder.safetensors"
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'empty'}", "retrain.source=pseudo-real", f"retrain.init={encoder}"])
    with pytest.raises(Exception, match="pseudo-label"):
        run_retrain(cfg, out_dir=tmp_path / "out")
