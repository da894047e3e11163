"""The EMA-Teacher math on hand-made tensors."""


import pytest
import torch

from semivit.errors import PseudoLabelCollapse
from semivit.stages.ssl import (
    DistributionAlignment,
    cutmix_boxes,
    prob_pseudo_mixup,
    smooth_one_hot,
    teacher_pseudo_labels,
    threshold_above_smoothing,
    unlabeled_loss,
)


def test_teacher_mask_and_hard_labels():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]]))
    conf, hard, mask = teacher_pseudo_labels(logits, tau=0.7)
    assert hard.tolist() == [0, 0, 2]
    assert torch.allclose(conf, torch.tensor([0.9, 0.4, 0.8]), atol=1e-6)
    assert mask.tolist() == [True, False, True]


def test_unlabeled_loss_is_normalised_by_whole_batch():
    logits = torch.zeros(4, 2)  # CE of a uniform prediction = log 2 for any target
    target = torch.tensor([0, 1, 0, 1])
    mask = torch.tensor([True, False, False, False])
    loss = unlabeled_loss(logits, target, mask)
    # one confident sample out of four: log2 / 4, not log2 / 1
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 4)
    assert unlabeled_loss(logits, target, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_smooth_one_hot_rows_sum_to_one():
    y = smooth_one_hot(torch.tensor([2, 0]), 4, smoothing=0.1)
    assert torch.allclose(y.sum(1), torch.ones(2))
    assert y[0, 2].item() == pytest.approx(0.9 + 0.025)
    assert y[0, 0].item() == pytest.approx(0.025)


def test_pseudo_mixup_lam_is_confidence_ratio_for_mixup():
    x = torch.stack([torch.full((1, 4, 4), float(v)) for v in (0.0, 1.0, 2.0)])
    conf = torch.tensor([0.9, 0.6, 0.3])
    hard = torch.tensor([0, 1, 2])
    perm = torch.tensor([1, 2, 0])
    out = prob_pseudo_mixup(x, conf, hard, 3, tau=0.7, smoothing=0.0, cutmix_prob=0.0, perm=perm)
    lam = conf / (conf + conf[perm])
    assert torch.allclose(out["lam"], lam)
    # Mixup: x_i * lam_i + x_pi(i) * (1 - lam_i)
    expect = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
    assert torch.allclose(out["images"], expect)
    # target weights follow lam, rows sum to 1
    assert torch.allclose(out["target"][0], torch.tensor([lam[0], 1 - lam[0], 0.0]))
    assert torch.allclose(out["target"].sum(1), torch.ones(3))
    # mask = max(p_i, p_pi(i)) >= tau: sample 1 (0.6 with 0.3) is below, 0 and 2 reach 0.9
    assert out["mask"].tolist() == [True, False, True]


def test_pseudo_mixup_cutmix_lam_is_box_area():
    torch.manual_seed(0)
    n, h, w = 64, 16, 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, h, w).contiguous()
    conf = torch.rand(n) * 0.5 + 0.5
    hard = torch.randint(0, 5, (n,))
    out = prob_pseudo_mixup(x, conf, hard, 5, tau=0.5, smoothing=0.1, cutmix_prob=1.0)
    perm = out["perm"]
    # the share of pixels still from image i equals the recomputed lam
    own = (out["images"] == x).float().mean(dim=(1, 2, 3))
    moved = perm != torch.arange(n)  # an image paired with itself keeps its pixels whatever the box
    assert moved.sum() > n // 2
    assert torch.allclose(own[moved], out["lam"][moved], atol=1e-6)
    assert torch.allclose(out["target"].sum(1), torch.ones(n), atol=1e-6)


def test_cutmix_box_clipped_area():
    lam = torch.tensor([0.75, 0.0, 1.0])
    box, new = cutmix_boxes(lam, 8, 8, torch.Generator().manual_seed(1))
    assert torch.allclose(new, 1 - box.float().mean(dim=(1, 2)))
    assert new[2].item() == 1.0  # lam 1: empty box


def test_pseudo_mixup_mixes_cutmix_and_mixup_per_sample():
    torch.manual_seed(1)
    out = prob_pseudo_mixup(torch.randn(200, 1, 8, 8), torch.rand(200), torch.randint(0, 3, (200,)), 3, 0.5, cutmix_prob=0.5)
    share = out["cutmix"].float().mean().item()
    assert 0.35 < share < 0.65


def _loop_reference(x, conf, hard, k, tau, perm, use_cut, cy, cx):
    """A per-sample version written independently, to check the batched one pixel by pixel."""
    outs, targets = [], []
    h, w = x.shape[2:]
    for i in range(x.shape[0]):
        j = int(perm[i])
        lam = float(conf[i] / (conf[i] + conf[j]))
        if use_cut[i]:
            r = (1 - lam) ** 0.5
            ch, cw = int(h * r), int(w * r)
            y1, y2 = max(int(cy[i]) - ch // 2, 0), min(int(cy[i]) + ch // 2, h)
            x1, x2 = max(int(cx[i]) - cw // 2, 0), min(int(cx[i]) + cw // 2, w)
            img = x[i].clone()
            img[:, y1:y2, x1:x2] = x[j, :, y1:y2, x1:x2]
            lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)
        else:
            img = lam * x[i] + (1 - lam) * x[j]
        outs.append(img)
        t = torch.zeros(k)
        t[hard[i]] += lam
        t[hard[j]] += 1 - lam
        targets.append(t)
    return torch.stack(outs), torch.stack(targets)


def test_batched_equals_per_sample_reference():
    n, k = 32, 4
    x = torch.randn(n, 1, 12, 12)
    conf = torch.rand(n) * 0.9 + 0.1
    hard = torch.randint(0, k, (n,))
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(n, generator=g)
    # replay the generator to learn which samples were cut and where
    state = g.get_state()
    out = prob_pseudo_mixup(x, conf, hard, k, 0.5, smoothing=0.0, cutmix_prob=0.5, perm=perm, generator=g)
    g.set_state(state)
    use_cut = torch.rand(n, generator=g) < 0.5
    cy = torch.randint(0, 12, (n,), generator=g)
    cx = torch.randint(0, 12, (n,), generator=g)
    ref_x, ref_t = _loop_reference(x, conf, hard, k, 0.5, perm, use_cut, cy, cx)
    assert torch.allclose(out["images"], ref_x, atol=1e-6)
    assert torch.allclose(out["target"], ref_t, atol=1e-6)


@pytest.mark.parametrize("row_by_row", [False, True])
@pytest.mark.parametrize("shape", [(24, 1, 12, 12), (10, 3, 40, 36)])
def test_mixing_paths_equal_per_sample_reference_bit_for_bit(monkeypatch, row_by_row, shape):
    """Both ways of mixing (batched kernels, and row by row for large CPU images) give exactly the
    per-sample loop's pixels and targets, and draw the same random numbers in the same order."""
    import semivit.stages.ssl as ssl

    monkeypatch.setattr(ssl, "_ROW_BY_ROW_MIN_VALUES", 0 if row_by_row else 10**12)
    n, c, h, w = shape
    k = 5
    x = torch.randn(shape)
    before = x.clone()
    conf = torch.rand(n) * 0.9 + 0.1
    hard = torch.randint(0, k, (n,))
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    out = prob_pseudo_mixup(x, conf, hard, k, 0.5, smoothing=0.0, cutmix_prob=0.5, generator=g)
    after = g.get_state()
    g.set_state(state)
    perm = torch.randperm(n, generator=g)
    use_cut = torch.rand(n, generator=g) < 0.5
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    assert torch.equal(g.get_state(), after)  # randperm, rand, randint(cy), randint(cx) and nothing else
    assert 0 < int(use_cut.sum()) < n  # both kinds of sample occur
    ref_x, ref_t = _loop_reference(x, conf, hard, k, 0.5, perm, use_cut, cy, cx)
    assert torch.equal(out["perm"], perm) and torch.equal(out["cutmix"], use_cut)
    assert torch.equal(out["images"], ref_x)
    # the reference keeps a CutMix lam in double precision for 1 - lam: one float32 ulp apart at most
    assert torch.allclose(out["target"], ref_t, rtol=0.0, atol=1.2e-7)
    assert torch.equal(x, before)  # the input batch is left as it was


def test_pseudo_label_stats_and_collapse_check(caplog):
    from semivit.stages.semi import check_collapse, pseudo_label_stats

    mask = torch.tensor([True, True, True, False, True])
    hard = torch.tensor([1, 1, 2, 0, 1])
    true = torch.tensor([1, 2, 2, 0, -1])  # last one: true label unknown
    s = pseudo_label_stats(mask, hard, true, num_classes=3)
    assert s["mask_ratio"] == pytest.approx(0.8)
    assert s["hist_pseudo"] == [0, 3, 1]
    assert s["pseudo_label_acc"] == pytest.approx(100 * 2 / 3)  # confident and known: 1->1, 1->2, 2->2
    assert s["pseudo_label_acc_all"] == pytest.approx(75.0)
    collapsed = {"pseudo_classes": 1, "hist_pseudo": [0, 50, 0, 0]}
    with caplog.at_level("WARNING", logger="semivit"):
        check_collapse(collapsed, 4, 0.5, stop=False, epoch=3)
    assert "collapsed" in caplog.text
    with pytest.raises(PseudoLabelCollapse, match="stop_on_collapse"):
        check_collapse(collapsed, 4, 0.5, stop=True, epoch=3)
    check_collapse({"pseudo_classes": 4, "hist_pseudo": [5, 5, 5, 5]}, 4, 0.5, stop=True, epoch=3)


def test_distribution_alignment_rebalances_a_biased_teacher():
    torch.manual_seed(0)
    # a teacher that favours class 0: every row puts extra mass there
    logits = torch.randn(512, 4) + torch.tensor([1.5, 0.0, 0.0, 0.0])
    probs = logits.softmax(1)
    da = DistributionAlignment(4, momentum=0.0)  # momentum 0: p_model is this batch's mean
    aligned = da(probs)
    assert torch.allclose(aligned.sum(1), torch.ones(512), atol=1e-6)
    assert torch.allclose(da.p_model, probs.mean(0))
    share = lambda p: torch.bincount(p.argmax(1), minlength=4).float() / len(p)  # noqa: E731
    assert share(probs)[0] > 0.5  # most hard labels are class 0 before alignment
    assert (share(aligned) - 0.25).abs().max() < (share(probs) - 0.25).abs().max() / 2
    # the labels it hands out through teacher_pseudo_labels are the aligned ones
    _, hard, _ = teacher_pseudo_labels(logits, tau=0.0, align=DistributionAlignment(4, momentum=0.0))
    assert torch.equal(hard, aligned.argmax(1))


def test_distribution_alignment_state_target_and_eval():
    da = DistributionAlignment(3, momentum=0.5, target=torch.tensor([2.0, 1.0, 1.0]))
    assert torch.allclose(da.p_target, torch.tensor([0.5, 0.25, 0.25]))
    da(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(da.p_model, torch.tensor([2 / 3, 1 / 6, 1 / 6]))  # 0.5 * uniform + 0.5 * batch
    before = da.p_model.clone()
    da.eval()
    da(torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.equal(da.p_model, before)  # evaluation does not move the running mean
    restored = DistributionAlignment(3)
    restored.load_state_dict(da.state_dict())  # saved and resumed with the training state
    assert torch.equal(restored.p_model, before) and torch.equal(restored.p_target, da.p_target)
    with pytest.raises(ValueError, match="non-negative"):
        DistributionAlignment(3, target=torch.zeros(3))
    with pytest.raises(ValueError, match="dist_align_momentum"):
        DistributionAlignment(3, momentum=1.0)


def test_threshold_above_what_smoothed_targets_reach_is_named():
    # targets smoothed by 0.1 over 10 classes put 0.91 on the true class: a model tends to that
    # confidence, so tau 0.95 keeps the mask empty; tau 0.7, or no smoothing, is fine
    logits = torch.log(smooth_one_hot(torch.tensor([0, 3]), 10, 0.1))
    conf, _, mask = teacher_pseudo_labels(logits, tau=0.95)
    assert conf.max().item() == pytest.approx(0.91) and not mask.any()
    why = threshold_above_smoothing(0.95, 0.1, 10)
    assert why is not None and "0.910" in why and "semi.label_smoothing=0" in why
    assert threshold_above_smoothing(0.7, 0.1, 10) is None
    assert threshold_above_smoothing(0.95, 0.0, 10) is None
    assert threshold_above_smoothing(0.95, 0.05, 10) is None  # ceiling 0.955
    assert threshold_above_smoothing(0.9, 0.1, 1000) is None  # ceiling 0.9001
    assert threshold_above_smoothing(0.95, 0.1, 1000) is not None
