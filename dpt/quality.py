"""Image measures that see what a person sees, computed the same way for real and synthetic images.

The judge-feature FID and the class accuracy look at what a classifier keeps of an image; neither
sees speckles (isolated bright pixels on the background, strokes broken into pieces). These do:

    isolated_pixel_rate   share of foreground pixels (intensity >= ``threshold``) with no
                          foreground pixel among their 8 neighbours, pooled over the images
    fragments             mean number of 8-connected foreground pieces per image (a clean digit
                          has 1, seldom 2; speckles and broken strokes add pieces)
    total_variation       mean over images of sum(|dx|) + sum(|dy|) per pixel, intensities in [0, 1]
    grid_edge_ratio       mean |intensity step| across the edges every ``period`` pixels (the
                          borders of a generator's P x P patches) over that across all other
                          edges: a patch-wise decoder that does not join its patches shows it

``texture_measures`` gives all three for one set; ``real_spread`` the range of each over disjoint
chunks of a real set, chunks as large as the synthetic set (its own sampling spread), so a
synthetic value can be read as "within the spread of real images" or not. ``comparison_grid``
puts real and synthetic images of the same classes side by side in one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpt.errors import DPTError

THRESHOLD = 128  # foreground: at least half the full intensity
MEASURES = ("isolated_pixel_rate", "fragments", "total_variation", "grid_edge_ratio")
PERIOD = 4  # the default generator's patch size at the time the measure was introduced


def as_gray_array(images) -> np.ndarray:
    """(N, H, W) uint8 from (N, H, W), (N, 1, H, W), (N, H, W, C) or (N, C, H, W) uint8 arrays or
    tensors (colour images are averaged over their channels)."""
    arr = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
    if arr.ndim == 4:
        channel_axis = 1 if arr.shape[1] in (1, 3) else 3
        arr = arr.mean(axis=channel_axis) if arr.shape[channel_axis] > 1 else arr.squeeze(channel_axis)
    if arr.ndim != 3:
        raise DPTError(f"texture measures need a batch of 2-D images, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def neighbour_counts(mask: np.ndarray) -> np.ndarray:
    """For a boolean (N, H, W) mask, the number of set pixels among each pixel's 8 neighbours."""
    padded = np.pad(mask.astype(np.int16), ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    total = np.zeros(mask.shape, dtype=np.int16)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                total += padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return total


def isolated_pixel_rate(images, threshold: int = THRESHOLD) -> float:
    """Share of foreground pixels without a foreground 8-neighbour (0 when there is no foreground)."""
    fg = as_gray_array(images) >= threshold
    n = int(fg.sum())
    if n == 0:
        return 0.0
    return float((fg & (neighbour_counts(fg) == 0)).sum() / n)


def fragments_per_image(images, threshold: int = THRESHOLD) -> np.ndarray:
    """The number of 8-connected foreground pieces of each image."""
    from scipy import ndimage

    fg = as_gray_array(images) >= threshold
    structure = np.ones((3, 3), dtype=bool)
    return np.array([ndimage.label(m, structure=structure)[1] for m in fg], dtype=np.int64)


def total_variation_per_image(images) -> np.ndarray:
    """Anisotropic total variation per pixel of each image, intensities scaled to [0, 1]."""
    x = as_gray_array(images).astype(np.float32) / 255.0
    tv = np.abs(np.diff(x, axis=1)).sum(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).sum(axis=(1, 2))
    return tv / (x.shape[1] * x.shape[2])


def grid_edge_ratio(images, period: int = PERIOD) -> float:
    """Mean absolute intensity step across the edges between pixel k and k+1 with (k+1) % period
    == 0 (rows and columns), over the mean step across all other edges."""
    x = as_gray_array(images).astype(np.float32) / 255.0
    if period < 2 or min(x.shape[1:]) <= period:
        raise DPTError(f"grid_edge_ratio needs 2 <= period < image size (got period {period}, size {x.shape[1:]})")
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))  # one value per horizontal edge line
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1))
    ratios = []
    for d in (dy, dx):
        on = (np.arange(len(d)) + 1) % period == 0
        ratios.append((d[on].mean(), d[~on].mean()))
    on, off = sum(r[0] for r in ratios), sum(r[1] for r in ratios)
    return float(on / max(off, 1e-9)) if on > 0 else 1.0  # finite, for JSON


def texture_measures(images, threshold: int = THRESHOLD, period: int = PERIOD) -> dict:
    """The measures of one image set (see the module's docstring)."""
    arr = as_gray_array(images)
    if len(arr) == 0:
        raise DPTError("texture measures need at least one image")
    return {
        "isolated_pixel_rate": isolated_pixel_rate(arr, threshold),
        "fragments": float(fragments_per_image(arr, threshold).mean()),
        "total_variation": float(total_variation_per_image(arr).mean()),
        "grid_edge_ratio": grid_edge_ratio(arr, period),
        "num_images": int(len(arr)),
    }


def real_spread(images, chunk: int, threshold: int = THRESHOLD, seed: int = 0) -> dict:
    """``{measure: [min, max]}`` over disjoint random chunks of ``chunk`` real images (at least two
    chunks): how far the measures of a set that size move by sampling alone."""
    arr = as_gray_array(images)
    chunk = min(int(chunk), len(arr) // 2)
    if chunk < 1:
        raise DPTError(f"real_spread needs at least 2 images (got {len(arr)})")
    order = np.random.default_rng(seed).permutation(len(arr))
    parts = [texture_measures(arr[order[i : i + chunk]], threshold) for i in range(0, len(arr) - chunk + 1, chunk)]
    return {m: [min(p[m] for p in parts), max(p[m] for p in parts)] for m in MEASURES} | {"chunks": len(parts),
                                                                                         "chunk": chunk}


def load_images(source, indices=None, size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, H, W), labels) of an ImageSource (grayscale), resized to ``size`` x ``size`` when
    ``size`` > 0 and the images differ (bilinear, as the generator's training data)."""
    from PIL import Image

    idx = range(len(source)) if indices is None else indices

    def one(i):
        img = source.load(int(i)).convert("L")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img)

    imgs = np.stack([one(i) for i in idx])
    return imgs, np.asarray(source.targets)[list(idx)]


def per_class_sample(labels: np.ndarray, classes: list[int], per_class: int, seed: int = 0) -> list[int]:
    """Positions of the first ``per_class`` images of each class after a seeded shuffle."""
    order = np.random.default_rng(seed).permutation(len(labels))
    out = []
    for c in classes:
        out.extend(int(j) for j in order[labels[order] == c][:per_class])
    return out


def comparison_grid(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
                    path: Path, per_class: int = 8, seed: int = 0, scale: int = 2) -> None:
    """One PNG: per class a row of real images (left) and of synthetic images of the same class
    (right), separated by a gap; pixels enlarged ``scale`` times. Written atomically."""
    from PIL import Image

    from semivit.files import atomic_path

    real, fake = as_gray_array(real), as_gray_array(fake)
    classes = sorted(set(np.asarray(fake_labels).tolist()) & set(np.asarray(real_labels).tolist()))[:10]
    if not classes:
        raise DPTError("comparison_grid: the real and the synthetic images share no class")
    h, w = fake.shape[1:]
    pad, gap = 1, 8
    width = 2 * per_class * (w + pad) + gap
    canvas = np.full((len(classes) * (h + pad), width), 255, dtype=np.uint8)
    blocks = ((real, np.asarray(real_labels), 0), (fake, np.asarray(fake_labels), per_class * (w + pad) + gap))
    for imgs, labels, x0 in blocks:
        for r, c in enumerate(classes):
            picks = per_class_sample(labels, [c], per_class, seed)
            for k, j in enumerate(picks):
                img = imgs[j]
                if img.shape != (h, w):
                    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
                y, x = r * (h + pad), x0 + k * (w + pad)
                canvas[y : y + h, x : x + w] = img
    out = Image.fromarray(canvas)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    with atomic_path(Path(path)) as tmp:
        out.save(tmp, format="PNG")


def synthetic_vs_real(synthetic_dir: str | Path, real_source, grid_path: Path | None = None,
                      threshold: int = THRESHOLD) -> dict:
    """Texture measures of a synthetic set (a folder written by ``dpt generate``) and of the real
    images ``real_source``, the real spread for chunks as large as the synthetic set, and (with
    ``grid_path``) the side-by-side grid."""
    from dpt.generate import load_synthetic_source

    classes = list(real_source.classes)
    fake_src = load_synthetic_source(synthetic_dir, classes, channels=1)
    fake, fake_labels = load_images(fake_src)
    real, real_labels = load_images(real_source)
    out = {
        "threshold": threshold,
        "synthetic": texture_measures(fake, threshold),
        "real": texture_measures(real, threshold),
        "real_spread": real_spread(real, len(fake), threshold),
    }
    if grid_path is not None:
        comparison_grid(real, real_labels, fake, fake_labels, grid_path)
        out["grid"] = str(grid_path)
    return out


# --------------------------------------------------------------------------------------------
# A small pixel classifier: the judge and the CAS of runs that have no stage-0/1 models
# --------------------------------------------------------------------------------------------


def small_cnn(num_classes: int):
    """Two conv blocks and a linear head (~60k parameters): ~98 % on MNIST-5k's test split when
    trained on its 4000 training digits, in about a CPU-minute."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.LazyLinear(num_classes),
    )


def train_cnn(images, labels, num_classes: int, epochs: int = 8, seed: int = 0, batch_size: int = 64):
    """A :func:`small_cnn` trained from scratch on uint8 images with Adam (lr 1e-3), light random
    shifts (up to 2 px), a fixed number of epochs: no model selection on any test split."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(as_gray_array(images)).float().div(255).unsqueeze(1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    net = small_cnn(num_classes)
    net(x[:2])  # materialise the lazy head
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb = F.pad(x[idx], (2, 2, 2, 2))
            dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
            xb = xb[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def cnn_predict(net, images, batch_size: int = 500) -> np.ndarray:
    import torch

    x = torch.from_numpy(as_gray_array(images)).float().div(255).unsqueeze(1)
    with torch.no_grad():
        return torch.cat([net(b).argmax(1) for b in x.split(batch_size)]).numpy()


def cnn_accuracy(net, images, labels) -> float:
    """Top-1 in percent."""
    return float(100.0 * np.mean(cnn_predict(net, images) == np.asarray(labels)))
