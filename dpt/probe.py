"""Stage 3 as DPT ran it on ImageNet (``retrain.mode=probe``): a frozen encoder and a multinomial
logistic regression on its features of the real labeled images plus the extra ones.

The encoder is the one ``retrain.init`` names (the MAE encoder of stage 0, the Semi-ViT model of
stage 1, or a file); its pooled, normalised features (the input of the ViT head) of every image are
computed once, without augmentation, on all ranks. The regression is fitted in full batch with
L-BFGS on standardised features; its L2 penalty is ``retrain.probe_l2``, or with ``auto`` the value
of a log grid with the best accuracy on held-out folds of the real labeled images (the extra images
always stay in the training folds; the test split is never looked at). The fitted regression is
folded into the ViT's head, so the result is an ordinary classifier folder that ``semivit
evaluate`` and the report read like any other.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semivit.config.schema import Config
from semivit.data.sources import ImageSource
from semivit.data.views import ViewDataset, build_transforms
from semivit.files import atomic_path, atomic_write_json, pyplot
from semivit.models.classifier import classifier_head, classifier_meta, save_classifier
from semivit.runtime.accelerator import make_accelerator
from semivit.runtime.layout import CONFIG, LABEL_SPLIT, METRICS
from semivit.stages.common import build_classifier, make_loader
from semivit.stages.evaluate import accuracy_metrics, make_test_loader, pct, predict

logger = logging.getLogger("dpt")

L2_GRID = tuple(10.0**e for e in range(-6, 1))  # probe_l2=auto chooses among these


class Features(torch.nn.Module):
    """The classifier's input to its head: a ViT's pooled tokens after ``fc_norm``, a CNN's pooled
    last feature map (timm's forward_features + forward_head(pre_logits=True))."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)


def extract(model, source: ImageSource, indices, tf, cfg: Config, accelerator, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``source[indices]`` (one pass, no augmentation, split over the ranks)."""
    ds = ViewDataset(source, np.asarray(indices), tf)
    loader = accelerator.prepare(make_loader(ds, cfg.pseudo_label.batch_size, shuffle=False, cfg=cfg, drop_last=False))
    feats, labels, _ = predict(Features(model), loader, accelerator, desc)
    return feats, labels


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C x D) and bias of a multinomial logistic regression: mean cross-entropy plus
    ``l2 / 2 * |W|^2``, minimised by full-batch L-BFGS (a convex problem: deterministic)."""
    x = x.double()
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().float(), b.detach().float()


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number for each sample: shuffled within each class, then dealt round-robin across
    the classes, so every fold gets a share of every class that has enough images."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    folds = np.empty(len(labels), dtype=np.int64)
    folds[order] = np.arange(len(order)) % k
    return folds


def choose_l2(x_real, y_real, x_extra, y_extra, num_classes: int, folds: int, seed: int, extra_only: bool) -> tuple[float, list]:
    """The L2 penalty of ``L2_GRID`` with the best held-out accuracy on the real labeled images.
    Each fold of them is held out in turn, the regression fitted on the other folds plus every
    extra image (or, with ``extra_only``, on the extra images alone and scored on all real ones)."""
    y_np = y_real.numpy()
    k = min(folds, len(y_np))
    split = np.zeros(len(y_np), dtype=np.int64) if extra_only else stratified_folds(y_np, k, seed)
    rounds = 1 if extra_only else k
    scores = []
    for l2 in L2_GRID:
        correct = 0
        for f in range(rounds):
            held = torch.as_tensor(split == f)
            parts_x = [x_extra] + ([] if extra_only else [x_real[~held]])
            parts_y = [y_extra] + ([] if extra_only else [y_real[~held]])
            xt, yt = torch.cat(parts_x), torch.cat(parts_y)
            mean, std = xt.mean(0), xt.std(0) + 1e-6
            W, b = fit_logreg((xt - mean) / std, yt, num_classes, l2)
            pred = (((x_real[held] - mean) / std) @ W.T + b).argmax(1)
            correct += int((pred == y_real[held]).sum())
        scores.append({"l2": l2, "heldout_acc": 100.0 * correct / len(y_np)})
    # ties go to the stronger penalty (the simpler model)
    best = max(reversed(scores), key=lambda s: s["heldout_acc"])
    return best["l2"], scores


def fold_into_head(vit, W: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """``head(z) = W ((z - mean) / std) + b``: the probe as the classifier's own linear head."""
    w = W / std
    head = classifier_head(vit)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b - w @ mean)


def run_probe(cfg: Config, bundle, out: Path, init: str, labeled_idx: np.ndarray, extra: ImageSource | None, info: dict) -> Path:
    rc = cfg.retrain
    t0 = time.time()
    out = Path(out)
    accelerator = make_accelerator(cfg, out, amp=cfg.finetune.amp)
    vit = build_classifier(cfg, bundle, init)
    vit.to(accelerator.device).eval()
    tf = build_transforms(cfg.data, bundle)["test"]
    x_real, y_real = extract(vit, bundle.train, labeled_idx, tf, cfg, accelerator, "probe: real labeled")
    empty = (torch.zeros(0, x_real.shape[1]), torch.zeros(0, dtype=torch.long))
    x_extra, y_extra = (
        extract(vit, extra, np.arange(len(extra)), tf, cfg, accelerator, "probe: extra") if extra is not None else empty
    )
    extra_only = rc.synthetic_only
    if rc.probe_l2 == "auto":
        l2, scores = choose_l2(x_real, y_real, x_extra, y_extra, bundle.num_classes, rc.probe_folds, cfg.seed, extra_only)
    else:
        l2, scores = float(rc.probe_l2), []
    xt = x_extra if extra_only else torch.cat([x_real, x_extra])
    yt = y_extra if extra_only else torch.cat([y_real, y_extra])
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    W, b = fit_logreg((xt - mean) / std, yt, bundle.num_classes, l2)
    train_acc = 100.0 * float(((((xt - mean) / std) @ W.T + b).argmax(1) == yt).float().mean())
    fold_into_head(vit, W.to(accelerator.device), b.to(accelerator.device), mean.to(accelerator.device), std.to(accelerator.device))
    test_loader = accelerator.prepare(make_test_loader(cfg, bundle))
    logits, labels, _ = predict(vit, test_loader, accelerator, "eval probe")
    m = accuracy_metrics(logits, labels, bundle.num_classes)
    metrics = {
        "top1": m["top1"],
        "top5": m["top5"],
        "per_class_acc": m["per_class"],
        "mode": "probe",
        "num_labeled": 0 if extra_only else int(len(labeled_idx)),
        "num_unlabeled": 0,
        "num_test": int(len(labels)),
        **info,
        "probe_l2": l2,
        "probe_l2_scores": scores,
        "probe_train_acc": train_acc,
        "feature_dim": int(x_real.shape[1]),
        "init": init,
        "seconds": round(time.time() - t0, 1),
    }
    logger.info("probe (L2 %g, %d training images, %d features): top1 %s", l2, len(yt), x_real.shape[1], pct(m["top1"]))
    if accelerator.is_main_process:
        from semivit.config.load import save_config
        from semivit.data.split import save_label_split

        save_classifier(out, vit, None, classifier_meta(cfg, bundle))
        save_label_split(out / LABEL_SPLIT, labeled_idx, bundle.train)
        if scores:
            plot_l2_scores(scores, l2, out / "probe_l2.png")
        save_config(cfg, out / CONFIG)
        atomic_write_json(out / METRICS, metrics)  # last: the marker that the stage is complete
    accelerator.wait_for_everyone()
    return out


def plot_l2_scores(scores: list, chosen: float, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.semilogx([s["l2"] for s in scores], [s["heldout_acc"] for s in scores], "o-")
    ax.axvline(chosen, ls="--", color="gray")
    ax.set_xlabel("L2 penalty")
    ax.set_ylabel("held-out accuracy %, real labeled")
    ax.set_title("probe: regularisation chosen on the training images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
