"""Stage 1b: EMA-Teacher semi-supervised fine-tuning (Semi-ViT), with probabilistic pseudo mixup.

Per step: B labeled images (strong view) and mu*B unlabeled ones (weak + strong view). The teacher
(an EMA of the student, or the student itself in FixMatch mode) labels the weak views; the student
learns from the strong views of the confident ones; with ``semi.dist_align`` the teacher's class
probabilities are aligned to a target class distribution first. The math lives in ``semivit.ssl``.
Writes ``<output_dir>/stage1/semi/`` (see ``stage.finish_classifier_stage``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy

from semivit.config.schema import Config
from semivit.data.run_split import run_split
from semivit.data.sources import ImageSource, build_data
from semivit.data.views import TwoViewDataset, build_transforms
from semivit.errors import PseudoLabelCollapse
from semivit.models.classifier import load_encoder_weights, resolve_weights_file
from semivit.runtime.layout import EMA_WEIGHTS, WEIGHTS, layout
from semivit.runtime.loop import Trainer
from semivit.stages.common import (
    build_classifier,
    classifier_outputs,
    cycle,
    labeled_loaders,
    make_ema,
    make_optimizer,
    next_labeled,
)
from semivit.stages.evaluate import evaluate_models, make_test_loader, pct
from semivit.stages.finetune import make_mixup
from semivit.stages.ssl import (
    DistributionAlignment,
    prob_pseudo_mixup,
    smooth_one_hot,
    teacher_pseudo_labels,
    threshold_above_smoothing,
    unlabeled_loss,
)

logger = logging.getLogger("semivit")


def semi_start_files(cfg: Config, init: str | None) -> tuple[Path, Path]:
    """(student, teacher) weights as Semi-ViT starts them (``main_semi.py --super_finetune``): the
    student from the fine-tuned model's own weights, the teacher from its EMA. A single weights
    file, or a folder with only one of the two, starts both from the same weights."""
    src = Path(init or cfg.checkpoint or layout(cfg).finetune)
    if not src.exists():
        raise FileNotFoundError(
            f"semi starts from a fine-tuned classifier, but '{src}' does not exist: run `semivit finetune` "
            "with the same output_dir first, or set checkpoint=FOLDER_OR_WEIGHTS_FILE"
        )
    if src.is_dir() and (src / WEIGHTS).is_file() and (src / EMA_WEIGHTS).is_file():
        return src / WEIGHTS, src / EMA_WEIGHTS
    file = resolve_weights_file(src)
    return file, file


def build_student_teacher(cfg: Config, bundle, student_file: Path, teacher_file: Path):
    """The student (the trained model) and its EMA teacher, each from its own weights file."""
    model = build_classifier(cfg, bundle, str(student_file), strict_head=True)
    ema = make_ema(model, cfg.semi.ema_decay)
    if teacher_file != student_file:
        load_encoder_weights(ema.module, teacher_file, strict_head=True)
    return model, ema


def pseudo_label_stats(conf_mask: torch.Tensor, hard: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict:
    """Mask ratio, and accuracy / macro precision / recall of the confident pseudo-labels against the
    hidden true labels (where known, label >= 0), plus their class histogram."""
    from torchmetrics.functional.classification import multiclass_precision, multiclass_recall

    out = {"mask_ratio": conf_mask.float().mean().item() if len(conf_mask) else 0.0}
    sel = conf_mask & (true >= 0)
    hist = torch.bincount(hard[conf_mask], minlength=num_classes)
    out["hist_pseudo"] = hist.tolist()
    out["pseudo_classes"] = int((hist > 0).sum())
    if sel.any():
        h, t = hard[sel], true[sel]
        out["pseudo_label_acc"] = 100 * (h == t).float().mean().item()
        out["pseudo_label_precision"] = 100 * multiclass_precision(h, t, num_classes, average="macro").item()
        out["pseudo_label_recall"] = 100 * multiclass_recall(h, t, num_classes, average="macro").item()
    known = true >= 0
    if known.any():
        out["pseudo_label_acc_all"] = 100 * (hard[known] == true[known]).float().mean().item()
    return out


def run_semi(
    cfg: Config,
    out_dir: Path | None = None,
    init: str | None = None,
    synthetic: ImageSource | None = None,
    synthetic_ratio: float = 0.5,
    name: str = "semi",
    info: dict | None = None,
) -> Path:
    sc = cfg.semi
    stage_dir = Path(out_dir) if out_dir else layout(cfg).semi
    student_file, init_file = semi_start_files(cfg, init)
    trainer = Trainer(
        cfg,
        name,
        stage_dir,
        sections=("data", "model", "semi", "retrain") if synthetic is not None else ("data", "model", "semi"),
        amp=sc.amp,
        grad_accum=sc.grad_accum,
        clip_grad=sc.clip_grad,
        skip_nonfinite=not sc.stop_on_nonfinite,
        nonfinite_hint="lower semi.lr or semi.lambda_u, or set semi.amp=no (semi.stop_on_nonfinite=false skips such steps)",
    )
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    K = bundle.num_classes
    tf = build_transforms(cfg.data, bundle)
    split = run_split(cfg, bundle.train, name)  # the run's labeled split, as fine-tuning saw it
    view = tf["train"]
    lab_loaders = labeled_loaders(trainer, bundle, split.labeled, view, cfg.semi.batch_size, synthetic, synthetic_ratio)
    unl_ds = TwoViewDataset(bundle.train, split.unlabeled, tf["weak"], tf["strong"])
    unl_loader = trainer.loader(unl_ds, sc.mu * sc.batch_size, shuffle=True)

    model, ema = build_student_teacher(cfg, bundle, student_file, init_file)
    model.to(trainer.device)  # the optimizer is built on the device (fused AdamW on CUDA)
    opt = make_optimizer(model, sc.lr, sc.weight_decay, sc.layer_decay)
    # an epoch: one pass over the unlabeled set (or semi.steps_per_epoch batches), shared by the ranks
    global_steps = sc.steps_per_epoch or len(unl_loader)
    model, unl_loader, *lab_loaders = trainer.prepare(
        model, opt, unl_loader, *lab_loaders, micro_steps=math.ceil(global_steps / trainer.accelerator.num_processes)
    )
    trainer.schedule(sc.epochs, int(sc.warmup_epochs * trainer.updates_per_epoch), sc.min_lr / sc.lr)
    test_loader = trainer.accelerator.prepare(make_test_loader(cfg, bundle))
    ema.to(trainer.device)
    align = make_alignment(sc, bundle.train, split.labeled, K, trainer.accelerator)
    trainer.track(ema=ema, **({"align": align} if align is not None else {}))
    trainer.resume()

    too_high = threshold_above_smoothing(sc.tau, sc.label_smoothing, K)
    if too_high and trainer.accelerator.is_main_process:  # once per run, not once per rank
        logger.warning(too_high)
    mixup = make_mixup(sc.mixup, sc.cutmix, sc.label_smoothing, K)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=sc.label_smoothing)
    lab_iters = [cycle(ld) for ld in lab_loaders]
    logger.info(
        "stage 1b (%s, teacher=%s): %d labeled%s, %d unlabeled, %d epochs x %d steps, init %s",
        name, sc.teacher, len(split.labeled), f" + {len(synthetic)} synthetic" if synthetic is not None else "",
        len(unl_ds), sc.epochs, trainer.updates_per_epoch, init_file,
    )
    seen: dict[str, list] = {"mask": [], "hard": [], "true": []}

    def batches(epoch):
        while True:  # the unlabeled loader is passed over as often as the epoch's steps need
            for weak_u, strong_u, true_u, _ in unl_loader:
                x_l, y_l = next_labeled(lab_iters)
                yield x_l, y_l, weak_u, strong_u, true_u

    def step(batch):
        x_l, y_l, weak_u, strong_u, true_u = batch
        losses, conf_mask, hard = train_step(
            model, ema, trainer.accelerator, criterion, mixup, sc, K, x_l, y_l, weak_u, strong_u, align
        )
        seen["mask"].append(conf_mask)
        seen["hard"].append(hard)
        seen["true"].append(true_u)
        return {"loss": losses[0], "loss_x": losses[1], "loss_u": losses[2]}

    def end_epoch(row: dict) -> None:
        acc = trainer.accelerator
        stats = pseudo_label_stats(*(acc.gather(torch.cat(seen[k])).cpu() for k in ("mask", "hard", "true")), K)
        for v in seen.values():
            v.clear()
        row.update(stats)
        if sc.eval_every and row["epoch"] % sc.eval_every == 0 and row["epoch"] < sc.epochs:
            m = evaluate_models(model, ema, test_loader, acc, K)
            row.update(top1=m["top1"], top1_ema=m["top1_ema"])
        logger.info(
            "%s epoch %d/%d mask %.2f pl_acc %s pl_hist %s",
            name, row["epoch"], sc.epochs, stats["mask_ratio"],
            f"{stats['pseudo_label_acc']:.1f}" if "pseudo_label_acc" in stats else "n/a", stats["hist_pseudo"],
        )
        check_collapse(stats, K, sc.collapse_min_classes, sc.stop_on_collapse, row["epoch"])

    trainer.fit(
        sc.epochs,
        batches,
        step,
        on_update=lambda s: ema.update(trainer.accelerator.unwrap_model(model), step=s),  # the teacher follows every optimizer step
        end_epoch=end_epoch,
    )

    final = evaluate_models(model, ema, test_loader, trainer.accelerator, K)
    stats: dict = {}
    if trainer.state.history:
        trainer.state.history[-1].update(top1=final["top1"], top1_ema=final["top1_ema"])
        stats = {k: v for k, v in trainer.state.history[-1].items() if k.startswith(("mask_ratio", "pseudo"))}
    metrics = {
        "top1": final["top1"],
        "top1_ema": final["top1_ema"],
        "top5": final["top5"],
        "top5_ema": final["top5_ema"],
        "num_labeled": int(len(split.labeled)),
        "num_unlabeled": int(len(split.unlabeled)),
        "num_test": final["num_test"],
        "mask_ratio": stats.get("mask_ratio"),
        "pseudo_label_acc": stats.get("pseudo_label_acc"),
        "pseudo_label_precision": stats.get("pseudo_label_precision"),
        "pseudo_label_recall": stats.get("pseudo_label_recall"),
        "per_class_acc_ema": final["per_class_acc_ema"],
        "teacher": sc.teacher,
        "init": str(init_file),
        "init_student": str(student_file),
        "epochs": sc.epochs,
        "seconds": round(trainer.seconds, 1),
    }
    if synthetic is not None:
        metrics.update(num_synthetic=len(synthetic), synthetic_ratio=synthetic_ratio)
    metrics.update(info or {})
    logger.info("%s done: top1 %s  top1_ema %s (%.0fs)", name, pct(metrics["top1"]), pct(metrics["top1_ema"]), trainer.seconds)
    write = classifier_outputs(cfg, trainer, model, ema, bundle, bundle.train, split.labeled)
    trainer.finish(metrics, write, "stage 1b: Semi-ViT" if synthetic is None else "stage 3: DPT retraining")
    return stage_dir


def make_alignment(sc, source: ImageSource, labeled_idx, num_classes: int, accelerator) -> DistributionAlignment | None:
    """``semi.dist_align``: none, uniform (every class equally often) or labeled (the class shares
    of the labeled subset, for data whose classes are not balanced)."""
    if sc.dist_align == "none":
        return None
    target = None
    if sc.dist_align == "labeled":
        labels = torch.as_tensor(np.asarray(source.targets)[np.asarray(labeled_idx)], dtype=torch.long)
        target = torch.bincount(labels, minlength=num_classes).float() + 1.0  # +1: no class gets 0
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    return DistributionAlignment(num_classes, sc.dist_align_momentum, target, reduce).to(accelerator.device)


def train_step(model, ema, accelerator, criterion, mixup, sc, num_classes, x_l, y_l, weak_u, strong_u, align=None):
    """One EMA-Teacher step's losses (total, labeled, unlabeled) and the teacher's mask and labels."""
    teacher = ema if sc.teacher == "ema" else accelerator.unwrap_model(model)
    with torch.no_grad():
        was_training = teacher.training
        teacher.eval()  # the teacher predicts without drop path
        with accelerator.autocast():
            t_logits = teacher(weak_u)
        teacher.train(was_training)
    conf, hard, conf_mask = teacher_pseudo_labels(t_logits, sc.tau, align)
    if sc.pseudo_mixup:
        pm = prob_pseudo_mixup(
            strong_u, conf, hard, num_classes, sc.tau, sc.label_smoothing, sc.pseudo_mixup_cutmix_prob
        )
        x_u, target_u, mask_u = pm["images"], pm["target"], pm["mask"]
    else:
        x_u, target_u, mask_u = strong_u, smooth_one_hot(hard, num_classes, 0.0), conf_mask
    if mixup is not None:
        x_l, y_l = mixup(x_l, y_l)
    n_l = x_l.shape[0]
    # one forward pass over labeled + unlabeled images
    with accelerator.autocast():
        logits = model(torch.cat([x_l, x_u]))
    loss_x = criterion(logits[:n_l].float(), y_l)
    loss_u = unlabeled_loss(logits[n_l:], target_u, mask_u)
    return (loss_x + sc.lambda_u * loss_u, loss_x, loss_u), conf_mask, hard


def check_collapse(stats: dict, num_classes: int, min_share: float, stop: bool, epoch: int) -> None:
    """Pseudo-labels that cover only a few classes are the first sign of confirmation bias."""
    covered = stats.get("pseudo_classes", num_classes)
    confident = sum(stats.get("hist_pseudo", []))
    if confident >= num_classes and covered < min_share * num_classes:
        msg = (
            f"pseudo-labels collapsed at epoch {epoch}: confident ones cover only {covered}/{num_classes} classes "
            f"(histogram {stats['hist_pseudo']}, mask ratio {stats.get('mask_ratio', 0):.2f}); with a low mask ratio lower "
            "semi.tau, with inaccurate pseudo-labels raise it; a better fine-tuned start (stage 1a) helps both"
        )
        if stop:
            raise PseudoLabelCollapse(msg + " (semi.stop_on_collapse=true)")
        logger.warning(msg)
