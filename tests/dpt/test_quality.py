"""The texture measures of dpt.quality: a clean stroke against the same stroke with salt noise,
real MNIST digits, the real spread and the side-by-side grid."""

import numpy as np
import pytest
from PIL import Image

from dpt.errors import DPTError
from dpt.quality import (
    comparison_grid,
    fragments_per_image,
    grid_edge_ratio,
    isolated_pixel_rate,
    real_spread,
    texture_measures,
    total_variation_per_image,
)


def stroke_images(n: int = 8) -> np.ndarray:
    """Clean digits-like strokes: a thick diagonal line and a ring, on a black background."""
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    yy, xx = np.mgrid[:28, :28]
    for k in range(n):
        if k % 2:
            imgs[k][np.abs(yy - xx - (k - 4)) <= 1] = 255
        else:
            r = np.hypot(yy - 14, xx - 14)
            imgs[k][(r >= 6 + k % 3) & (r <= 8 + k % 3)] = 255
    return imgs


def salted(imgs: np.ndarray, share: float = 0.03, seed: int = 0) -> np.ndarray:
    """Salt (isolated bright pixels on the background) and pepper (holes in the strokes)."""
    rng = np.random.default_rng(seed)
    out = imgs.copy()
    out[rng.random(out.shape) < share] = 255
    out[(rng.random(out.shape) < share) & (imgs > 0)] = 0
    return out


def test_salt_raises_every_measure():
    clean = stroke_images()
    noisy = salted(clean)
    a, b = texture_measures(clean), texture_measures(noisy)
    assert a["isolated_pixel_rate"] == 0.0  # a solid stroke: every pixel has a foreground neighbour
    assert b["isolated_pixel_rate"] > 0.05
    assert b["fragments"] > a["fragments"] + 5
    assert b["total_variation"] > a["total_variation"] * 1.5


def test_isolated_pixels_counted_exactly():
    img = np.zeros((1, 10, 10), dtype=np.uint8)
    img[0, 2, 2] = 200  # alone
    img[0, 5, 5] = img[0, 6, 6] = 200  # diagonal neighbours: not isolated
    img[0, 8, 1] = 100  # below the threshold: background
    assert isolated_pixel_rate(img) == pytest.approx(1 / 3)
    assert fragments_per_image(img).tolist() == [2]
    assert isolated_pixel_rate(np.zeros((2, 5, 5), dtype=np.uint8)) == 0.0


def test_channel_layouts_agree():
    noisy = salted(stroke_images())
    ref = isolated_pixel_rate(noisy)
    assert isolated_pixel_rate(noisy[:, None]) == ref  # (N, 1, H, W)
    assert isolated_pixel_rate(np.repeat(noisy[..., None], 3, axis=3)) == ref  # (N, H, W, 3)
    with pytest.raises(DPTError, match="2-D images"):
        isolated_pixel_rate(noisy[0, 0])


def test_total_variation_of_a_step():
    img = np.zeros((1, 4, 4), dtype=np.uint8)
    img[0, :, 2:] = 255  # one vertical edge of height 4: TV = 4 / 16 pixels
    assert total_variation_per_image(img)[0] == pytest.approx(0.25)


def test_real_mnist_digits_are_clean():
    from semivit.data.sources import _mnist5k

    test = _mnist5k()[1]
    imgs = np.stack([np.asarray(test.load(i)) for i in range(300)])
    m = texture_measures(imgs)
    assert m["isolated_pixel_rate"] < 0.002
    assert 1.0 <= m["fragments"] < 1.2
    spread = real_spread(imgs, 100)
    assert spread["chunks"] == 3
    lo, hi = spread["isolated_pixel_rate"]
    assert 0 <= lo <= hi < 0.002
    # the same digits with salt fall far outside the real spread
    assert texture_measures(salted(imgs))["isolated_pixel_rate"] > 10 * max(hi, 1e-3)


def test_comparison_grid(tmp_path):
    real = stroke_images(20)
    fake = salted(real)
    labels = np.arange(20) % 2
    out = tmp_path / "grid.png"
    comparison_grid(real, labels, fake, labels, out, per_class=4, scale=1)
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 29, 2 * 4 * 29 + 8)
    left, right = img[:, : 4 * 29], img[:, 4 * 29 + 8 :]
    # the synthetic half carries the salt, the real half does not
    assert isolated_pixel_rate(right[None]) > isolated_pixel_rate(left[None])
    with pytest.raises(DPTError, match="share no class"):
        comparison_grid(real, labels, fake, labels + 5, out)


def test_grid_edge_ratio_sees_patch_seams():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(16, 28, 28)), axis=2)  # random walks along rows: no seams
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    blocky = np.kron(rng.integers(0, 256, size=(16, 7, 7)), np.ones((4, 4))).astype(np.uint8)  # 4x4 blocks
    assert grid_edge_ratio(smooth) == pytest.approx(1.0, abs=0.15)
    assert grid_edge_ratio(blocky) > 10  # every step sits on a patch border
    assert grid_edge_ratio(blocky, period=3) < grid_edge_ratio(blocky)
    with pytest.raises(DPTError, match="period"):
        grid_edge_ratio(smooth, period=1)
