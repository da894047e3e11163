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
from torchvision import transforms as T
from tqdm.auto import tqdm

from semivit.config import Config
from semivit.data import ImageSource, TwoViewDataset, ViewDataset, build_data, build_transforms, make_split
from semivit.engine import TrainState, make_accelerator, maybe_resume, prepare_stage_dir, save_checkpoint, warmup_cosine
from semivit.evaluate import evaluate_models, make_test_loader
from semivit.finetune import make_mixup
from semivit.models import resolve_weights_file
from semivit.ssl import (
    DistributionAlignment,
    prob_pseudo_mixup,
    smooth_one_hot,
    teacher_pseudo_labels,
    unlabeled_loss,
)
from semivit.stage import (
    Timer,
    build_classifier,
    check_stop,
    cycle,
    finish_classifier_stage,
    make_ema,
    make_loader,
    make_optimizer,
    optimizer_step,
    update_ema,
)

logger = logging.getLogger("semivit")


def resolve_semi_init(cfg: Config, init: str | None) -> Path:
    """``init`` argument, else the ``checkpoint`` setting, else this run's fine-tuned classifier;
    a classifier folder gives its EMA weights (student and teacher both start from them)."""
    src = Path(init or cfg.checkpoint or cfg.run_dir / "stage1" / "finetune")
    if not src.exists():
        raise FileNotFoundError(
            f"semi starts from a fine-tuned classifier, but '{src}' does not exist: run `semivit finetune` "
            "with the same output_dir first, or set checkpoint=FOLDER_OR_WEIGHTS_FILE"
        )
    return resolve_weights_file(src)


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


def _labeled_loaders(cfg, bundle, tf, labeled_idx, synthetic, ratio):
    B = cfg.semi.batch_size
    loaders = []
    if synthetic is None:
        loaders.append(make_loader(ViewDataset(bundle.train, labeled_idx, tf["train"]), B, shuffle=True, cfg=cfg))
        return loaders
    if synthetic.num_classes != bundle.num_classes:
        raise ValueError(
            f"the synthetic set has {synthetic.num_classes} classes, data '{cfg.data.name}' {bundle.num_classes}; "
            "generate it from a model trained on this data set"
        )
    b_real, b_syn = round((1 - ratio) * B), round(ratio * B)
    # synthetic images may differ in size or mode: convert to the data's channels; 'train' resizes
    mode = T.Lambda(lambda img: img.convert("L" if bundle.channels == 1 else "RGB"))
    if b_real > 0:
        loaders.append(make_loader(ViewDataset(bundle.train, labeled_idx, tf["train"]), b_real, shuffle=True, cfg=cfg))
    if b_syn > 0:
        syn = ViewDataset(synthetic, np.arange(len(synthetic)), T.Compose([mode, tf["train"]]))
        loaders.append(make_loader(syn, b_syn, shuffle=True, cfg=cfg))
    return loaders


def run_semi(
    cfg: Config,
    out_dir: Path | None = None,
    init: str | None = None,
    synthetic: ImageSource | None = None,
    synthetic_ratio: float = 0.5,
) -> Path:
    sc = cfg.semi
    stage_dir = Path(out_dir) if out_dir else cfg.run_dir / "stage1" / "semi"
    init_file = resolve_semi_init(cfg, init)
    accelerator = make_accelerator(cfg, stage_dir, sc.amp, sc.grad_accum)
    prepare_stage_dir(cfg, stage_dir, accelerator, "semi")
    bundle = build_data(cfg.data)
    K = bundle.num_classes
    tf = build_transforms(cfg.data, bundle)
    split = make_split(cfg.data, bundle.train, cfg.seed)
    lab_loaders = _labeled_loaders(cfg, bundle, tf, split.labeled, synthetic, synthetic_ratio)
    unl_ds = TwoViewDataset(bundle.train, split.unlabeled, tf["weak"], tf["strong"])
    unl_loader = make_loader(unl_ds, sc.mu * sc.batch_size, shuffle=True, cfg=cfg)

    model = build_classifier(cfg, bundle, str(init_file), strict_head=True)
    ema = make_ema(model, sc.ema_decay)  # the teacher starts equal to the student
    opt = make_optimizer(model, sc.lr, sc.weight_decay, sc.layer_decay)
    steps_per_epoch = sc.steps_per_epoch or len(unl_loader)  # single-process steps
    updates_per_epoch = math.ceil(steps_per_epoch / sc.grad_accum)
    sched = warmup_cosine(opt, int(sc.warmup_epochs * updates_per_epoch), sc.epochs * updates_per_epoch, sc.min_lr / sc.lr)
    model, opt, unl_loader, sched, *lab_loaders = accelerator.prepare(model, opt, unl_loader, sched, *lab_loaders)
    test_loader = accelerator.prepare(make_test_loader(cfg, bundle))
    ema.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(ema)
    align = make_alignment(sc, bundle.train, split.labeled, K, accelerator)
    if align is not None:
        accelerator.register_for_checkpointing(align)
    maybe_resume(cfg, accelerator, stage_dir)
    timer = Timer(state)

    mixup = make_mixup(sc.mixup, sc.cutmix, sc.label_smoothing, K)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=sc.label_smoothing)
    lab_iters = [cycle(ld) for ld in lab_loaders]
    local_steps = math.ceil(steps_per_epoch / accelerator.num_processes)
    logger.info(
        "stage 1b (semi, teacher=%s): %d labeled%s, %d unlabeled, %d epochs x %d steps, init %s",
        sc.teacher, len(split.labeled), f" + {len(synthetic)} synthetic" if synthetic is not None else "",
        len(unl_ds), sc.epochs, steps_per_epoch, init_file,
    )
    stats: dict = {}
    for epoch in range(state.epoch, sc.epochs):
        model.train()
        sums = torch.zeros(3, device=accelerator.device)  # loss, loss_x, loss_u
        masks, hards, trues = [], [], []
        bar = tqdm(total=local_steps, desc=f"semi {epoch + 1}/{sc.epochs}", leave=False, disable=not accelerator.is_local_main_process)
        step_in_epoch = 0
        while step_in_epoch < local_steps:
            for weak_u, strong_u, true_u, _ in unl_loader:
                if step_in_epoch >= local_steps:
                    break
                x_l, y_l = _next_labeled(lab_iters)
                with accelerator.accumulate(model):
                    losses, conf_mask, hard = train_step(
                        model, ema, accelerator, criterion, mixup, sc, K, x_l, y_l, weak_u, strong_u, align
                    )
                    if not torch.isfinite(losses[0]):
                        msg = f"semi loss is {losses[0].item()} at epoch {epoch + 1}; lower semi.lr, lambda_u, or set semi.amp=no"
                        if sc.stop_on_nonfinite:
                            raise FloatingPointError(msg + " (semi.stop_on_nonfinite=false skips such steps)")
                        logger.warning(msg + "; step skipped")
                        opt.zero_grad(set_to_none=True)
                        step_in_epoch += 1
                        continue
                    accelerator.backward(losses[0])
                    optimizer_step(accelerator, model, opt, sched, sc.clip_grad)
                update_ema(accelerator, model, ema, state)  # the teacher follows every optimizer step
                sums += torch.stack([x.detach().float() for x in losses])
                masks.append(conf_mask)
                hards.append(hard)
                trues.append(true_u)
                step_in_epoch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[0].item():.3f}", mask=f"{conf_mask.float().mean().item():.2f}")
        bar.close()
        state.epoch = epoch + 1
        mean = accelerator.reduce(sums / max(1, step_in_epoch), "mean").tolist()
        stats = pseudo_label_stats(
            accelerator.gather(torch.cat(masks)).cpu(),
            accelerator.gather(torch.cat(hards)).cpu(),
            accelerator.gather(torch.cat(trues)).cpu(),
            K,
        )
        row = {"epoch": state.epoch, "loss": mean[0], "loss_x": mean[1], "loss_u": mean[2], "lr": max(g["lr"] for g in opt.param_groups)}
        row.update(stats)
        if sc.eval_every and state.epoch % sc.eval_every == 0 and state.epoch < sc.epochs:
            m = evaluate_models(model, ema, test_loader, accelerator, K)
            row.update(top1=m["top1"], top1_ema=m["top1_ema"])
        row["seconds"] = timer.seconds
        state.history.append(row)
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}, step=state.epoch)
        logger.info(
            "semi epoch %d/%d loss %.3f (x %.3f u %.3f) mask %.2f pl_acc %s pl_hist %s%s (%.0fs)",
            state.epoch, sc.epochs, mean[0], mean[1], mean[2], stats["mask_ratio"],
            f"{stats['pseudo_label_acc']:.1f}" if "pseudo_label_acc" in stats else "n/a", stats["hist_pseudo"],
            f" top1 {row['top1']:.2f} ema {row['top1_ema']:.2f}" if "top1" in row else "", timer.seconds,
        )
        check_collapse(stats, K, sc.collapse_min_classes, sc.stop_on_collapse, state.epoch)
        if state.epoch < sc.epochs:
            save_checkpoint(accelerator, stage_dir, state.epoch)
            check_stop(cfg, state.epoch)

    final = evaluate_models(model, ema, test_loader, accelerator, K)
    if state.history:
        state.history[-1].update(top1=final["top1"], top1_ema=final["top1_ema"])
        stats = {k: v for k, v in state.history[-1].items() if k.startswith(("mask_ratio", "pseudo"))}
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
        "epochs": sc.epochs,
        "seconds": round(timer.seconds, 1),
    }
    if synthetic is not None:
        metrics.update(num_synthetic=len(synthetic), synthetic_ratio=synthetic_ratio)
    logger.info("semi done: top1 %.2f  top1_ema %.2f (%.0fs)", metrics["top1"], metrics["top1_ema"], timer.seconds)
    finish_classifier_stage(
        cfg, accelerator, stage_dir, model, ema, bundle, state, metrics, bundle.train, split.labeled, "stage 1b: Semi-ViT"
    )
    return stage_dir


def _next_labeled(iters) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [next(it) for it in iters]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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
            raise RuntimeError(msg + " (semi.stop_on_collapse=true)")
        logger.warning(msg)
