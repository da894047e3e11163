"""Image folders as real collections come: sizes, aspect ratios and modes that differ per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (mode, extension): RGB JPEG, grayscale PNG, RGBA PNG, 16-bit grayscale PNG, palette GIF-like PNG, CMYK JPEG
MODES = (("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("I;16", ".png"), ("P", ".png"), ("CMYK", ".jpg"))


def mixed_image(rng: np.random.Generator, mode: str, height: int, width: int) -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray((rng.integers(0, 65536, (height, width))).astype(np.uint16))
    if mode == "P":
        return rgb.convert("P")
    return rgb.convert(mode)


def make_mixed_imagefolder(root: str | Path, classes=("a", "b", "c"), per_class: int = 6, held_out: int = 3,
                           seed: int = 0, min_side: int = 12, max_side: int = 64) -> Path:
    """``ROOT/train/<class>/`` and ``ROOT/val/<class>/`` with images of random sizes (aspect ratios
    from 1:3 to 3:1) in the modes of MODES, in turn."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    k = 0
    for split, count in (("train", per_class), ("val", held_out)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode, ext = MODES[k % len(MODES)]
                k += 1
                h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
                mixed_image(rng, mode, h, w).save(folder / f"{name}_{i:04d}{ext}")
    return root
