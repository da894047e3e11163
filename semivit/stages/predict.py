"""``semivit predict``: a trained classifier (any stage's folder) labels new images into a CSV.

``predict.images`` is a folder (any depth; files that are not images are skipped and counted) or a
list file (one path per line, or a CSV with a ``path`` column). Images may have any size, mode or
format: each is resized by the classifier's test view. The CSV has one row per image, in the order
of the listing, whatever the number of processes: ``path,class,confidence,top5`` where ``top5`` is
``class:probability`` pairs joined by ``;``, most probable first.
"""

from __future__ import annotations

import copy
import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from semivit.config.schema import Config
from semivit.data.sources import UNKNOWN, DataBundle, FileSource, list_images, readable_images
from semivit.data.views import ViewDataset, build_transforms
from semivit.errors import ConfigError
from semivit.files import atomic_path
from semivit.models.classifier import load_classifier, read_classifier_meta
from semivit.runtime.accelerator import make_accelerator
from semivit.runtime.layout import META, layout
from semivit.stages.common import make_loader

logger = logging.getLogger("semivit")

COLUMNS = ["path", "class", "confidence", "top5"]


def predictions_path(cfg: Config, folder: Path) -> Path:
    return Path(cfg.predict.out) if cfg.predict.out else layout(cfg).root / "predictions" / f"{folder.name}.csv"


def run_predict(cfg: Config) -> Path:
    if not cfg.checkpoint:
        raise ConfigError("predict needs checkpoint=FOLDER, a classifier folder (stage1/semi, stage3, ...)")
    folder = Path(cfg.checkpoint).expanduser()
    if folder.is_file():  # a weights file inside a classifier folder
        folder = folder.parent
    if not (folder / META).is_file():
        raise ConfigError(
            f"checkpoint='{cfg.checkpoint}' is not a classifier folder (no {META}): give the output folder of "
            "finetune, semi or retrain (e.g. runs/NAME/stage1/semi)"
        )
    if not cfg.predict.images:
        raise ConfigError("predict needs predict.images=FOLDER_OR_LIST_FILE, the images to label")
    meta = read_classifier_meta(folder)
    paths, _ = list_images(cfg.predict.images, "predict.images")
    paths, bad = readable_images(paths, cfg.data.skip_unreadable, "predict.images")
    if bad:
        logger.warning("predict: %d unreadable images left out (data.skip_unreadable), e.g. '%s'", len(bad), bad[0][0])
    classes = [str(c) for c in meta["classes"]]
    channels = int(meta["channels"])
    source = FileSource(paths, [UNKNOWN] * len(paths), classes, "L" if channels == 1 else "RGB", photos=True)
    mean, std = tuple(meta.get("mean", (0.5,) * channels)), tuple(meta.get("std", (0.5,) * channels))
    view_cfg = copy.deepcopy(cfg.data)
    view_cfg.image_size = int(meta["image_size"])  # the size the classifier was trained at
    bundle = DataBundle("predict", source, source, channels, mean, std)
    tf = build_transforms(view_cfg, bundle)["test"]
    out = predictions_path(cfg, folder)
    accelerator = make_accelerator(cfg, out.parent)
    model, _ = load_classifier(folder, prefer_ema=cfg.predict.use_ema)
    model = model.to(accelerator.device).eval()
    # each rank labels one contiguous share into its own part file; rank 0 joins the parts in order,
    # so no rank holds the probabilities of every image
    rank, world = accelerator.process_index, accelerator.num_processes
    share = np.array_split(np.arange(len(source)), world)[rank]
    loader = make_loader(ViewDataset(source, share, tf), cfg.predict.batch_size, False, cfg, drop_last=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    label_share(model, loader, accelerator, source.paths, classes, part_path(out, rank, world))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [part_path(out, r, world) for r in range(world)]
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
            f.write(",".join(COLUMNS) + "\n")
            for part in parts:
                with open(part, newline="") as src:
                    shutil.copyfileobj(src, f)
        for part in parts:
            part.unlink(missing_ok=True)
        logger.info("predict: %d images labeled by '%s' -> %s", len(source), folder, out)
    accelerator.wait_for_everyone()
    return out


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.stem}.part{rank}of{world}.csv")


@torch.no_grad()
def label_share(model, loader, accelerator, paths: list[str], classes: list[str], part: Path) -> None:
    """This rank's rows (path, class, confidence, top-5 as ``name:p;...``), written batch by batch."""
    k = min(5, len(classes))
    with atomic_path(part) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        for images, _, index in loader:
            with accelerator.autocast():
                logits = model(images.to(accelerator.device, non_blocking=True))
            top_p, top_c = logits.float().softmax(dim=1).topk(k, dim=1)
            for i, ps, cs in zip(index.tolist(), top_p.cpu().tolist(), top_c.cpu().tolist(), strict=True):
                top5 = ";".join(f"{classes[c]}:{p:.4f}" for p, c in zip(ps, cs, strict=True))
                w.writerow([paths[i], classes[cs[0]], f"{ps[0]:.4f}", top5])
