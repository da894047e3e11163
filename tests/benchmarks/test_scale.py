"""benchmarks/scale.py --small: every stage runs on an ImageNet-like folder of mixed sizes, and the
JSON carries, per stage, sizes, rank counts, seconds, RssAnon, the fitted slope and the extrapolation."""

import json

import numpy as np
import pytest

from benchmarks import scale


def test_fit_and_rss_anon():
    fixed, slope = scale.fit([1000, 2000, 4000], [301.0, 302.0, 304.0])
    assert fixed == pytest.approx(300.0) and slope == pytest.approx(0.001)
    assert 10 < scale.rss_anon_mb() < 100_000
    with scale.PeakSampler(every=0.001) as peak:
        block = np.ones(40 * 2**20 // 8)  # 40 MB of anonymous memory
        block.sum()
        del block
    assert peak.peak >= scale.rss_anon_mb() + 30


@pytest.mark.slow  # ten fresh processes: about 2 minutes on an idle 2-core machine
def test_scale_small_writes_every_stage(tmp_path):
    assert scale.main(["--small", "--sizes", "30", "60", "--work", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "small" / "scale.json").read_text())
    assert set(result["provenance"]) >= {"command", "commit", "machine", "date"}
    stages = result["results"]["stages"]
    assert list(stages) == list(scale.STAGES)
    for stage in stages.values():
        assert stage["n"] == [30, 60] and stage["ranks"] == [1]
        assert len(stage["seconds"]["1"]) == 2 and all(s > 0 for s in stage["seconds"]["1"])
        assert all(100 < m < 10_000 for m in stage["rss_anon_mb"]["1"])
        assert isinstance(stage["rss_anon_mb_per_1k_images"], float)
        assert stage["extrapolated"]["n"] == scale.IMAGENET_TRAIN and stage["extrapolated"]["ranks"] == 8
    # the folder is ImageNet-like: JPEGs of several sizes, some grayscale
    from PIL import Image

    files = sorted((tmp_path / "small" / "data-60" / "train").rglob("*.JPEG"))
    assert len(files) == 60
    sizes = {Image.open(f).size for f in files}
    modes = {Image.open(f).mode for f in files}
    assert len(sizes) > 20 and modes == {"RGB", "L"}
    # the generated set FID compared has as many images as the data set
    assert len(list((tmp_path / "small" / "synthetic-60").glob("*/*.png"))) == 60  # plus grid.png at the top
