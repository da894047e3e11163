"""Top-1 / top-5 / per-class accuracy on the held-out split, identical on 1 or N processes.

``gather_for_metrics`` collects predictions from every rank and drops the samples that the
distributed sampler repeated to even out the last batch, so no test image is counted twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from semivit.config.schema import Config
from semivit.data.sources import build_data
from semivit.data.split import make_split
from semivit.data.views import ViewDataset, build_transforms
from semivit.errors import ConfigError
from semivit.runtime.accelerator import make_accelerator, write_metrics
from semivit.runtime.layout import EMA_WEIGHTS, LABEL_SPLIT, layout

logger = logging.getLogger("semivit")


@torch.no_grad()
def predict(model, loader, accelerator, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and source indices of every sample of a prepared loader, from all ranks."""
    was_training = model.training
    model.eval()
    logits, labels, indices = [], [], []
    for images, y, idx in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        with accelerator.autocast():
            out = model(images)
        out, y, idx = accelerator.gather_for_metrics((out.float(), y, idx))
        logits.append(out.cpu())
        labels.append(y.cpu())
        indices.append(idx.cpu())
    model.train(was_training)
    if not logits:  # an empty set (your own data without val/): no predictions
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels), torch.cat(indices)


def pct(x) -> str:
    """A top-1 for the log: '12.34', or 'n/a' when there was no held-out image."""
    return "n/a (no held-out images)" if x is None else f"{x:.2f}"


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    from torchmetrics.functional.classification import multiclass_accuracy

    if len(labels) == 0:  # no held-out images: nothing is measured (None, never 0)
        return {"top1": None, "top5": None, "per_class": None}
    k5 = min(5, num_classes)
    top1 = multiclass_accuracy(logits, labels, num_classes, average="micro").item()
    top5 = multiclass_accuracy(logits, labels, num_classes, average="micro", top_k=k5).item()
    per_class = multiclass_accuracy(logits, labels, num_classes, average=None)
    return {"top1": 100 * top1, "top5": 100 * top5, "per_class": [round(100 * v, 2) for v in per_class.tolist()]}


def evaluate_models(student, ema, loader, accelerator, num_classes: int) -> dict:
    """The stage's standard numbers: student top-1/top-5, EMA top-1/top-5 and per-class accuracy."""
    logits, labels, _ = predict(student, loader, accelerator, "eval student")
    m = accuracy_metrics(logits, labels, num_classes)
    out = {"top1": m["top1"], "top5": m["top5"], "per_class_acc": m["per_class"], "num_test": int(len(labels))}
    if ema is not None:
        logits, labels, _ = predict(ema, loader, accelerator, "eval ema")
        e = accuracy_metrics(logits, labels, num_classes)
        out.update(top1_ema=e["top1"], top5_ema=e["top5"], per_class_acc_ema=e["per_class"])
    else:
        out.update(top1_ema=m["top1"], top5_ema=m["top5"], per_class_acc_ema=m["per_class"])
    return out


def make_test_loader(cfg: Config, bundle, batch_size: int = 256) -> DataLoader:
    tf = build_transforms(cfg.data, bundle)["test"]
    ds = ViewDataset(bundle.test, np.arange(len(bundle.test)), tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers)


def _count_rows(csv_path: Path) -> int | None:
    if not csv_path.is_file():
        return None
    with open(csv_path) as f:
        return max(0, sum(1 for _ in f) - 1)


def run_evaluate(cfg: Config, checkpoint: str) -> dict:
    """Evaluate a classifier folder (student and EMA weights) on the held-out split; the numbers
    go to ``<output_dir>/evaluate/<folder name>/metrics.json`` and are returned."""
    from semivit.models.classifier import load_classifier, read_classifier_meta
    from semivit.stages.class_checks import check_same_classes, data_description

    if not checkpoint:
        raise ConfigError("evaluate needs checkpoint=FOLDER (a finetune/semi/retrain output folder)")
    folder = Path(checkpoint)
    out_dir = layout(cfg).evaluation(folder.name)
    meta = read_classifier_meta(folder)  # a wrong folder fails before any data is read
    bundle = build_data(cfg.data, layout(cfg).image_lists)
    check_same_classes(
        meta["classes"], f"classifier '{folder}'", bundle.classes, data_description(cfg.data),
        "evaluate it on the data set it was trained on (data.name / data.root)",
    )
    accelerator = make_accelerator(cfg, out_dir)
    student, meta = load_classifier(folder, prefer_ema=False)
    ema = None
    if (folder / EMA_WEIGHTS).is_file():
        ema, _ = load_classifier(folder, prefer_ema=True)
    loader = accelerator.prepare(make_test_loader(cfg, bundle))
    student = accelerator.prepare(student)
    if ema is not None:
        ema = ema.to(accelerator.device)
    metrics = evaluate_models(student, ema, loader, accelerator, bundle.num_classes)
    num_labeled = _count_rows(folder / LABEL_SPLIT)
    if num_labeled is None:
        num_labeled = len(make_split(cfg.data, bundle.train, cfg.seed).labeled)
    metrics.update(
        num_labeled=num_labeled,
        num_unlabeled=len(bundle.train) - num_labeled,
        checkpoint=str(folder),
    )
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(out_dir, metrics)
        logger.info("evaluate %s: top1 %s  top1_ema %s  top5 %s", folder, pct(metrics["top1"]), pct(metrics["top1_ema"]), pct(metrics["top5"]))
    accelerator.wait_for_everyone()
    return metrics

