"""A data set as a user has it: ``labeled/<class>/``, ``unlabeled/`` (nested folders, names that
carry nothing), optional ``val/<class>/``; mixed formats, modes and sizes, and a stray non-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (format suffix, PIL mode) cycled over the images: PNG/JPEG, L/RGB/RGBA/P/CMYK
KINDS = [(".png", "RGB"), (".jpg", "RGB"), (".png", "RGBA"), (".png", "P"), (".jpg", "CMYK"), (".png", "L")]


def _image(rng, label: int, k: int, size: tuple[int, int]) -> np.ndarray:
    """A learnable pattern: class c is a bright bar at a class-dependent position, plus noise."""
    w, h = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    band = max(1, h // 4)
    top = (label * band) % max(1, h - band)
    img[top : top + band] = 200 + (k % 50)
    return img


def save_image(path: Path, array: np.ndarray, mode: str) -> None:
    img = Image.fromarray(array, "RGB")
    if mode == "RGBA":
        alpha = np.full(array.shape[:2], 255, np.uint8)
        alpha[0, :] = 0
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha))
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE, colors=32)
    else:
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


def make_own_data(
    root: Path,
    classes=("ant", "bee", "cow"),
    labeled_per_class=(3, 2, 4),
    unlabeled: int = 12,
    val_per_class: int = 2,
    seed: int = 0,
) -> dict:
    """Writes the layout under ``root``; returns the unlabeled image paths (and their hidden classes,
    which the data set never sees)."""
    rng = np.random.default_rng(seed)
    k = 0
    for c, (name, n) in enumerate(zip(classes, labeled_per_class, strict=True)):
        for i in range(n):
            suffix, mode = KINDS[k % len(KINDS)]
            size = (16 + 4 * (k % 3), 12 + 5 * (k % 4))
            save_image(root / "labeled" / name / f"img{i}{suffix}", _image(rng, c, k, size), mode)
            k += 1
        for i in range(val_per_class):
            suffix, mode = KINDS[k % len(KINDS)]
            save_image(root / "val" / name / f"v{i}{suffix}", _image(rng, c, k, (18, 18)), mode)
            k += 1
    paths, hidden = [], []
    for i in range(unlabeled):
        c = i % len(classes)
        suffix, mode = KINDS[(k + i) % len(KINDS)]
        sub = ["", "a", "a/b", "c/d/e"][i % 4]  # nested folders
        p = root / "unlabeled" / sub / f"{rng.integers(1 << 30):x}{suffix}"
        save_image(p, _image(rng, c, k + i, (14 + 3 * (i % 5), 20)), mode)
        paths.append(str(p))
        hidden.append(c)
    (root / "unlabeled" / "a").mkdir(parents=True, exist_ok=True)
    (root / "unlabeled" / "a" / "notes.txt").write_text("not an image")
    (root / "labeled" / classes[0] / "Thumbs.db").write_bytes(b"\0\1")
    return {"unlabeled": paths, "hidden": hidden}
