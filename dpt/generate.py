"""Stage 2b: write a labeled synthetic data set with the trained class-conditional model.

Layout: ``OUT/<class_dir>/<class_id>_<index>.png``, ``OUT/manifest.csv``
(``file,label,class_name,seed,guidance_scale,sampler,steps,model``), ``OUT/grid.png`` and
``OUT/metrics.json``. Image ``index`` of class ``c`` starts from noise seeded by (seed, c, index)
alone, batches are fixed slices of the global work list, and batches are dealt round-robin to the
processes: the same settings give the same images on 1 or N processes. Every file is written
under a temporary name and renamed; a re-run skips the files that exist, so an interrupted run
finishes with nothing lost, duplicated or generated twice.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpt.diffusion.codec import Codec, load_vae
from dpt.diffusion.model import load_generator, read_generator_files
from dpt.diffusion.sampling import AMP_DTYPES, image_noise, image_seed, make_sampler, sample
from dpt.errors import DPTClassMismatchError, DPTError
from semivit.config.schema import Config, DataConfig
from semivit.data.sources import FileSource
from semivit.files import atomic_path, atomic_write_json
from semivit.runtime.layout import GRID, MANIFEST, METRICS, layout
from semivit.stages.class_checks import check_known_classes, check_same_classes, data_class_names, data_description

logger = logging.getLogger("dpt")

MANIFEST_COLUMNS = ["file", "label", "class_name", "seed", "guidance_scale", "sampler", "steps", "model"]
SETTINGS_FILE = ".generation.json"  # the settings the images in a folder were made with
FILE_RE = re.compile(r"^(\d+)_(\d+)\.png$")
GRID_MAX_ROWS = 100


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A folder name for a class: letters, digits, '-', '_' and '.' only, never '.'/'..' or hidden."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s[:100] or "class"


def class_dirs(classes: list[str]) -> list[str]:
    """One distinct safe folder name per class (a suffix ``-<id>`` separates names that collide)."""
    names = [safe_name(c) for c in classes]
    seen: dict[str, int] = {}
    for n in names:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
    return [f"{n}-{i}" if seen[n.lower()] > 1 else n for i, n in enumerate(names)]


def image_file(class_id: int, index: int) -> str:
    return f"{class_id:04d}_{index:06d}.png"


def parse_classes(spec: str, classes: list[str]) -> list[int]:
    """``"3,7"`` or ``"cat,dog"`` -> class ids; empty: all classes."""
    if not spec.strip():
        return list(range(len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if part in index:
            out.append(index[part])
        elif part.isdigit() and int(part) < len(classes):
            out.append(int(part))
        else:
            raise DPTError(
                f"generate.classes: unknown class '{part}'; the model's classes are "
                f"{classes[:20]}{' ...' if len(classes) > 20 else ''} (names or ids 0..{len(classes) - 1})"
            )
    return sorted(set(out))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def out_dir_of(cfg: Config) -> Path:
    return Path(cfg.generate.out) if cfg.generate.out else layout(cfg).synthetic


def model_dir_of(cfg: Config) -> Path:
    return Path(cfg.generate.model) if cfg.generate.model else layout(cfg).generator


def pending_work(out: Path, dirs: list[str], class_ids: list[int], per_class: int) -> list[tuple[int, int]]:
    """(class, index) pairs whose file does not exist yet, in a fixed order."""
    return [(c, i) for c in class_ids for i in range(per_class) if not (out / dirs[c] / image_file(c, i)).is_file()]


def check_settings(out: Path, settings: dict, write: bool) -> None:
    """Images already in ``out`` must come from the same model and settings, so that the manifest
    describes every file truthfully; the first run records them."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise DPTError(
                f"'{out}' already holds images made with other settings {diff} (old, new); use another "
                "output folder (generate.out=DIR) or delete that one"
            )
    elif write:
        atomic_write_json(path, settings)


def save_png(img: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")


def check_generator_fits(cfg: Config, model_dir: Path, meta: dict, sched_config, check_data: bool | None) -> None:
    """The sampler's step count fits the generator's schedule, and the generator's classes are the
    configured data set's (when the config names one: ``check_data``, or by default when the data
    section is not the bare defaults), so a synthetic set never carries another data set's labels."""
    train_steps = int(dict(sched_config).get("num_train_timesteps", 1000))
    if cfg.generate.steps > train_steps:
        raise DPTError(
            f"setting 'generate.steps' must be <= {train_steps}, the generator's number of training timesteps "
            f"(got {cfg.generate.steps})"
        )
    if check_data is None:
        check_data = cfg.data != DataConfig()
    data_classes = data_class_names(cfg.data) if check_data else None
    if data_classes is not None:
        check_same_classes(
            meta["classes"], f"generator '{model_dir}'", data_classes, data_description(cfg.data),
            "use the generator trained on this data set (generate.model=DIR) or the data it was trained on",
            error=DPTClassMismatchError,
        )


def run_generate(cfg: Config, check_data: bool | None = None) -> Path:
    from semivit.runtime.accelerator import make_accelerator

    gcfg = cfg.generate
    if gcfg.num_per_class < 0:
        raise DPTError("setting 'generate.num_per_class' must be >= 0")
    if gcfg.steps < 1:
        raise DPTError("setting 'generate.steps' must be >= 1")
    out = out_dir_of(cfg)
    model_dir = model_dir_of(cfg)
    _, meta, sched_config = read_generator_files(model_dir)
    check_generator_fits(cfg, model_dir, meta, sched_config, check_data)  # before the weights are loaded
    model, sched_config, meta = load_generator(model_dir)
    classes = list(meta["classes"])
    class_ids = parse_classes(gcfg.classes, classes)
    dirs = class_dirs(classes)
    null = int(meta["null_label"])
    # sampling runs at the generator's training precision (diffusion.amp)
    accelerator = make_accelerator(cfg, out, amp=cfg.diffusion.amp)
    amp_dtype = AMP_DTYPES[cfg.diffusion.amp]
    device = accelerator.device
    model.to(device)
    codec = Codec(load_vae(meta["vae"]) if meta.get("vae") else None).to(device)
    sampler = make_sampler(sched_config, gcfg.sampler)
    settings = {
        "model": str(model_dir.resolve()),
        "seed": int(gcfg.seed),
        "guidance_scale": float(gcfg.guidance_scale),
        "sampler": gcfg.sampler,
        "steps": int(gcfg.steps),
        "image_size": int(meta["image_size"]),
        # added later: present only when used, so folders made before it keep matching
        **({"guidance_min_t": float(gcfg.guidance_min_t)} if gcfg.guidance_min_t > 0 else {}),
        # pixel-space DDIM images made before ClippedDDIMScheduler came from another update rule
        **({"ddim_noise": "clipped"} if gcfg.sampler == "ddim" and sched_config.get("clip_sample") else {}),
    }
    # every rank lists the missing files before any rank writes one
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings, write=True)
    accelerator.wait_for_everyone()
    check_settings(out, settings, write=False)
    work = pending_work(out, dirs, class_ids, gcfg.num_per_class)
    accelerator.wait_for_everyone()
    for c in class_ids:
        (out / dirs[c]).mkdir(parents=True, exist_ok=True)

    batches = [work[s : s + gcfg.batch_size] for s in range(0, len(work), gcfg.batch_size)]
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    shape = (meta["model_channels"], meta["model_size"], meta["model_size"])
    logger.info(
        "generate: %d images to make (%d classes x %d, %d already there), %s %d steps, w=%.2f, %d processes",
        len(work),
        len(class_ids),
        gcfg.num_per_class,
        len(class_ids) * gcfg.num_per_class - len(work),
        gcfg.sampler,
        gcfg.steps,
        gcfg.guidance_scale,
        accelerator.num_processes,
    )
    start = time.time()
    made = 0
    for batch in mine:
        labels = torch.tensor([c for c, _ in batch], device=device)
        noise, gens = image_noise([image_seed(gcfg.seed, c, i) for c, i in batch], shape, device)
        x = sample(model, sampler, noise, labels, null, gcfg.guidance_scale, gcfg.steps, gens, amp_dtype, gcfg.guidance_min_t)
        imgs = ((codec.decode(x) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        imgs = imgs.permute(0, 2, 3, 1).cpu().numpy()
        for (c, i), img in zip(batch, imgs, strict=True):
            save_png(img, out / dirs[c] / image_file(c, i))
        made += len(batch)
    seconds = time.time() - start
    total_made = int(accelerator.gather(torch.tensor([made], device=device)).sum().item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rows = write_manifest(out, classes, dirs, settings)
        write_grid(out, rows, classes, meta["channels"])
        atomic_write_json(
            out / METRICS,
            {
                "num_images": len(rows),
                "generated_this_run": total_made,
                "seconds": seconds,
                "images_per_second": total_made / seconds if seconds > 0 and total_made else None,
                "num_processes": accelerator.num_processes,
                "classes": [classes[c] for c in class_ids],
                "num_per_class": gcfg.num_per_class,
                **settings,
            },
        )
        logger.info("generate: %d new images in %.1f s -> %s", total_made, seconds, out)
    accelerator.wait_for_everyone()
    return out


def write_manifest(out: Path, classes: list[str], dirs: list[str], settings: dict) -> list[dict]:
    """The manifest lists every finished image in ``out`` (rebuilt from the files, so it is right
    after any interruption); the seed column is the image's own noise seed."""
    rows = []
    for c, d in enumerate(dirs):
        folder = out / d
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = FILE_RE.match(p.name)
            if not m or int(m.group(1)) != c:
                continue
            i = int(m.group(2))
            rows.append(
                {
                    "file": f"{d}/{p.name}",
                    "label": c,
                    "class_name": classes[c],
                    "seed": image_seed(settings["seed"], c, i),
                    "guidance_scale": settings["guidance_scale"],
                    "sampler": settings["sampler"],
                    "steps": settings["steps"],
                    "model": settings["model"],
                }
            )
    with atomic_path(out / MANIFEST) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def write_grid(out: Path, rows: list[dict], classes: list[str], channels: int, per_row: int = 10) -> None:
    """``grid.png``: one row per class (the first ``per_row`` images; at most 100 classes)."""
    by_class: dict[int, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r["file"])
    if not by_class:
        return
    from dpt.train_diffusion import save_grid

    mode = "L" if channels == 1 else "RGB"
    tiles, size = [], None
    for c in sorted(by_class)[:GRID_MAX_ROWS]:
        files = by_class[c][:per_row]
        for f in files + [None] * (per_row - len(files)):
            if f is None:
                tiles.append(torch.zeros_like(tiles[-1]))
                continue
            with Image.open(out / f) as im:
                arr = np.asarray(im.convert(mode))
            t = torch.from_numpy(arr.copy())
            t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
            size = size or t.shape
            tiles.append(t if t.shape == size else torch.zeros(size, dtype=torch.uint8))
    save_grid(torch.stack(tiles), out / GRID, nrow=per_row)


# --------------------------------------------------------------------------------------------
# Reading a synthetic data set (stage 3 and the metrics)
# --------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DPTError(f"'{path}' not found: '{folder}' is not a synthetic data set written by 'dpt generate'")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DPTError(f"'{path}' is not a readable CSV ({e}); re-run 'dpt generate' to rebuild it") from e
    if rows and not {"file", "class_name"} <= set(rows[0]):
        raise DPTError(f"'{path}' lacks the columns file, class_name; found {list(rows[0])}")
    short = next((n for n, r in enumerate(rows, 2) if not r.get("file") or not r.get("class_name")), None)
    if short is not None:
        raise DPTError(f"'{path}' line {short} has no file or class_name; re-run 'dpt generate' to rebuild it")
    return rows


def load_synthetic_source(
    folder: str | Path, classes: list[str], channels: int, per_class: int = 0, seed: int = 0
) -> FileSource:
    """The synthetic images of ``folder`` as a :class:`FileSource` whose labels index ``classes``
    (matched by class name). ``per_class`` > 0 keeps that many images of each class, drawn with
    ``seed``; every class must then have that many."""
    folder = Path(folder)
    rows = read_manifest(folder)
    if not rows:
        raise DPTError(f"'{folder / MANIFEST}' lists no images; run 'dpt generate' again")
    index = {c: i for i, c in enumerate(classes)}
    check_known_classes(
        [r["class_name"] for r in rows], f"'{folder / MANIFEST}'", classes, "the data set",
        "the synthetic set was made for other classes: generate it with a model trained on this data set",
        error=DPTClassMismatchError,
    )
    root = folder.resolve()
    paths, labels = [], []
    for r in rows:
        p = (folder / r["file"]).resolve()
        if root not in p.parents:
            raise DPTError(f"'{folder / MANIFEST}': file '{r['file']}' points outside the folder")
        paths.append(p)
        labels.append(index[r["class_name"]])
    labels = np.array(labels, dtype=np.int64)
    if per_class > 0:
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < per_class:
                raise DPTError(
                    f"'{folder}' has {len(idx)} images of class '{classes[c]}', fewer than the {per_class} asked "
                    "for (retrain.synthetic_per_class); generate more or ask for fewer"
                )
            keep.append(np.sort(rng.choice(idx, size=per_class, replace=False)))
        sel = np.concatenate(keep)
        paths, labels = [paths[j] for j in sel], labels[sel]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DPTError(
            f"{len(missing)} images listed in '{folder / MANIFEST}' are missing, e.g. '{missing[0]}'; re-run "
            "'dpt generate' with the same settings to restore them"
        )
    return FileSource([str(p) for p in paths], labels, classes, mode="L" if channels == 1 else "RGB")
