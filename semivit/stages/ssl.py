"""The tensor math of EMA-Teacher semi-supervised learning, as pure functions.

Nothing here touches a model, a loader or a device setting: the training loop in ``semi.py``
feeds these functions logits and images, and the tests feed them hand-made tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from semivit.errors import ConfigError


def teacher_pseudo_labels(
    logits: torch.Tensor, tau: float, align: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence p = max softmax, hard label argmax and the mask p >= tau, from teacher logits;
    ``align`` (e.g. a ``DistributionAlignment``) maps the class probabilities first."""
    probs = logits.detach().float().softmax(dim=1)
    if align is not None:
        probs = align(probs)
    conf, hard = probs.max(dim=1)
    return conf, hard, conf >= tau


class DistributionAlignment(torch.nn.Module):
    """Distribution alignment (ReMixMatch): q_aligned ~ q * p_target / p_model, renormalised.

    ``p_model`` is a running mean (momentum m) of the teacher's class probabilities on unlabeled
    batches, ``p_target`` the class distribution the pseudo-labels should follow (uniform, or the
    labeled set's). A teacher that has started to favour a few classes sees their probabilities
    scaled down and the neglected classes' scaled up, which counters the confirmation bias that
    makes pseudo-labels pile up on a few classes when labels are very few. The running mean is a
    buffer, so it is saved and resumed with the training state.
    ``reduce`` averages the batch mean over processes, so every rank aligns with the same p_model.
    """

    def __init__(
        self,
        num_classes: int,
        momentum: float = 0.99,
        target: torch.Tensor | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"semi.dist_align_momentum must be in [0, 1), got {momentum}")
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        if target is None:
            target = uniform
        target = torch.as_tensor(target, dtype=torch.float32).clamp_min(0)
        if target.shape != (num_classes,) or target.sum() <= 0:
            raise ConfigError(f"the alignment target must be {num_classes} non-negative class weights, not all zero")
        self.momentum = momentum
        self.reduce = reduce
        self.register_buffer("p_target", target / target.sum())
        self.register_buffer("p_model", uniform.clone())

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        if self.training:
            batch_mean = probs.mean(dim=0)
            if self.reduce is not None:
                batch_mean = self.reduce(batch_mean)
            self.p_model.mul_(self.momentum).add_(batch_mean.to(self.p_model), alpha=1 - self.momentum)
        aligned = probs * (self.p_target / self.p_model.clamp_min(1e-6)).to(probs)
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot rows with ``smoothing`` spread evenly over all classes; every row sums to 1."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def threshold_above_smoothing(tau: float, smoothing: float, num_classes: int) -> str | None:
    """Why few unlabeled images will pass ``tau``, or None. A model trained on targets smoothed by
    ``smoothing`` tends to a top probability of 1 - s + s/K (0.91 for s = 0.1, K = 10), so a threshold
    at or above it keeps the mask nearly empty (measured: FixMatch's 0.95 with smoothing 0.1 gave a
    mask ratio of 0.00-0.01 over 20 epochs at 2 labels per class)."""
    ceiling = 1.0 - smoothing + smoothing / num_classes
    if smoothing <= 0 or tau < ceiling:
        return None
    return (f"semi.tau={tau:g} is at or above {ceiling:.3f}, the top probability a model trained with "
            f"semi.label_smoothing={smoothing:g} on {num_classes} classes tends to (1 - s + s/K): few unlabeled "
            "images will pass it (see the mask ratio per epoch); lower semi.tau or set semi.label_smoothing=0")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against a probability vector (soft target)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def unlabeled_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """(1/N) * sum_i mask_i * CE(logits_i, target_i) over the N unlabeled samples.

    The sum is divided by the whole unlabeled batch, not by the number of confident samples: early
    in training few samples pass the threshold, and dividing by that small count would blow up the
    gradient of the few pseudo-labels that do, which are the least reliable ones.
    ``target`` is either hard labels (N,) or soft targets (N, K).
    """
    if target.dim() == 1:
        target = smooth_one_hot(target, logits.shape[1], smoothing)
    per_sample = soft_cross_entropy(logits, target)
    return (per_sample * mask.float()).sum() / max(1, logits.shape[0])


def _cutmix_box_corners(lam: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None):
    """One CutMix box per sample (side ratio sqrt(1 - lam_i), centre drawn uniformly: all ``cy``
    then all ``cx``) as ``(lo, hi)``, each (2, N): row 0 the rows [y1, y2), row 1 the columns
    [x1, x2), clipped to the image; and lam recomputed from each clipped box area. Both axes go
    through the same few operations at once (small tensors: the cost is per operation)."""
    n, device = lam.shape[0], lam.device
    ratio = torch.sqrt((1.0 - lam).clamp(0.0, 1.0))
    sides = torch.full((2, 1), height, device=device)  # filled on the device: no host copy, no sync
    sides[1] = width
    half = (sides * ratio).long() // 2
    centre = torch.stack(
        [
            torch.randint(0, height, (n,), generator=generator, device=device),
            torch.randint(0, width, (n,), generator=generator, device=device),
        ]
    )
    lo = (centre - half).clamp_(min=0)  # the centre is inside, so lo < side and hi >= 0 already
    hi = torch.minimum(centre + half, sides)
    pixels = height * width
    # (pixels - area) / pixels is one rounding of an exact integer ratio: the same float a
    # per-sample loop gets from 1 - area / pixels in Python doubles
    kept = (pixels - (hi - lo).prod(dim=0)).float() / pixels
    return (lo, hi), kept


def _box_bands(corners, height: int, width: int, rows_on: torch.Tensor | None = None):
    """The separable box masks: a row band (N, H, 1) and a column band (N, 1, W), boolean.
    ``rows_on`` (N,) switches a sample's row band off (no box at all)."""
    lo, hi = corners
    pos = torch.arange(max(height, width), device=lo.device)
    inside = (pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))  # (2, N, max side)
    if rows_on is not None:
        inside[0] &= rows_on.view(-1, 1)
    return inside[0, :, :height, None], inside[1, :, None, :width]


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None):
    """One CutMix box per sample with side ratio sqrt(1 - lam_i), centred uniformly at random.

    Returns the boolean box masks (N, H, W) (True = pixel comes from the partner image) and lam
    recomputed from each clipped box area, so the target weights match the pixels actually mixed.
    """
    corners, kept = _cutmix_box_corners(lam, height, width, generator)
    in_rows, in_cols = _box_bands(corners, height, width)
    return in_rows & in_cols, kept


# Per-sample rows of at least this many values are mixed row by row on the CPU: there every
# full-batch temporary costs a fresh allocation (page faults) and a pass through memory, which a
# few slice operations per row avoid; smaller rows (and any GPU batch) are mixed in a handful of
# batched kernels, where per-row Python calls would dominate.
_ROW_BY_ROW_MIN_VALUES = 16384


def _mix_row_by_row(images, perm, lam, use_cut, corners) -> torch.Tensor:
    """Each output row from slices of the batch: a CutMix row is its own image with the partner's
    box copied over it, a Mixup row ``x_i * lam_i + x_j * (1 - lam_i)`` through one reusable row
    buffer. Nothing of full-batch size is allocated but the output."""
    out = torch.empty_like(images)
    (y1, x1), (y2, x2) = (c.tolist() for c in corners)
    partner, cut, weight = perm.tolist(), use_cut.tolist(), lam.tolist()
    sources, targets = images.unbind(0), out.unbind(0)
    scratch = None
    for i, j in enumerate(partner):
        own, dst = sources[i], targets[i]
        if cut[i]:
            dst.copy_(own)
            box = (slice(None), slice(y1[i], y2[i]), slice(x1[i], x2[i]))
            dst[box].copy_(sources[j][box])
        else:
            if scratch is None:
                scratch = torch.empty_like(own)
            # two products and a sum, rounded as the per-sample formula rounds them
            torch.mul(own, weight[i], out=dst)
            dst.add_(torch.mul(sources[j], 1.0 - weight[i], out=scratch))
    return out


def _mix_batched(images, perm, lam, use_cut, corners) -> torch.Tensor:
    """The whole batch as ``x[perm] * partner + x * own`` with per-pixel weights (N, H, W):
    Mixup rows 1 - lam_i and lam_i, CutMix rows 0 / 1 outside the box and 1 / 0 inside it. For
    finite pixels y * 0 + x * 1 is exactly x, so both kinds come out as a per-sample loop's.

    One weight buffer serves as box, partner and own weights in turn, and x * own goes channel by
    channel through one more such buffer: few full-size temporaries, since each one that the heap
    cannot reuse costs page faults (on the CPU, about as much as the arithmetic at 28 px)."""
    _, c, h, w = images.shape
    in_rows, in_cols = _box_bands(corners, h, w, rows_on=use_cut)
    cut = use_cut.view(-1, 1, 1)
    lam = lam.to(images.dtype).view(-1, 1, 1)
    # with a box of 0s and 1s every product and sum below is exact: the weights are those of the
    # per-sample formula to the last bit
    weight = in_rows.to(images.dtype) * in_cols.to(images.dtype)  # the box; 0 on Mixup rows
    weight.add_(torch.where(cut, 0.0, 1.0 - lam))  # partner: box + 0 | 0 + (1 - lam)
    out = images.index_select(0, perm).mul_(weight.unsqueeze(1))
    weight.mul_(cut.to(images.dtype))  # the box again: box * 1 | (1 - lam) * 0
    torch.sub(torch.where(cut, 1.0, lam), weight, out=weight)  # own: 1 - box | lam - 0
    if c == 1:
        return out.add_(weight.mul_(images[:, 0]).unsqueeze(1))
    scratch = torch.empty_like(weight)
    for ch in range(c):
        out[:, ch].add_(torch.mul(images[:, ch], weight, out=scratch))
    return out


def prob_pseudo_mixup(
    images: torch.Tensor,
    conf: torch.Tensor,
    pseudo: torch.Tensor,
    num_classes: int,
    tau: float,
    smoothing: float = 0.1,
    cutmix_prob: float = 0.5,
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Semi-ViT's probabilistic pseudo mixup, for the whole batch at once.

    With a random permutation pi: lam_i = p_i / (p_i + p_pi(i)) (the more confident pseudo-label
    gets the larger share, instead of a Beta draw); each sample is CutMix-ed with probability
    ``cutmix_prob`` (lam_i then recomputed from the clipped box area) and Mixup-ed otherwise.
    Target: lam_i * smooth(y_i) + (1 - lam_i) * smooth(y_pi(i)); mask: max(p_i, p_pi(i)) >= tau.
    """
    n, c, h, w = images.shape
    device = images.device
    if perm is None:
        perm = torch.randperm(n, generator=generator, device=device)
    conf = conf.float()
    conf_p = conf[perm]
    lam = conf / (conf + conf_p).clamp_min(1e-12)
    use_cut = torch.rand(n, generator=generator, device=device) < cutmix_prob
    corners, box_lam = _cutmix_box_corners(lam, h, w, generator)
    lam = torch.where(use_cut, box_lam, lam)

    if device.type == "cpu" and c * h * w >= _ROW_BY_ROW_MIN_VALUES:
        out = _mix_row_by_row(images, perm, lam, use_cut, corners)
    else:
        out = _mix_batched(images, perm, lam, use_cut, corners)

    onehot = smooth_one_hot(pseudo, num_classes, smoothing)
    target = lam.view(-1, 1) * onehot + (1.0 - lam.view(-1, 1)) * onehot[perm]
    mask = torch.maximum(conf, conf_p) >= tau
    return {"images": out, "target": target, "mask": mask, "lam": lam, "perm": perm, "cutmix": use_cut}
