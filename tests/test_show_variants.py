"""`bgjax show-variants` and the grid picture: rows from a fake source, the PNG, the real CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bgjax import plots, show_variants, variants
from bgjax.data import DatasetInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSource:
    """3 classes, 12 examples of 16x16: a class-coloured square on per-example stripes."""

    def __init__(self):
        labels = np.arange(12, dtype=np.int32) % 3
        self.info = DatasetInfo("fake", "train", ("ant", "bee", "cat"), labels)

    def __len__(self):
        return len(self.info.labels)

    def __getitem__(self, index):
        label = int(self.info.labels[index])
        image = np.zeros((16, 16, 3), np.uint8)
        image[:, ::2] = 10 + 10 * index  # stripes identify the example the background came from
        image[:, 1::2] = 5
        image[5:11, 4:12] = (255, 40 * label, 0)
        mask = np.zeros((16, 16), np.uint8)
        mask[5:11, 4:12] = 1
        bbox = np.array([4, 5, 12, 11], np.int32)
        return dict(image=image, mask=mask, bbox=bbox, label=np.int32(label), habitat=np.int32(-1))


def expected_size(nrows, ncols):
    return (
        round((plots.GRID_LEFT_IN + ncols * plots.GRID_CELL_IN) * plots.DPI),
        round((plots.GRID_TOP_IN + nrows * plots.GRID_CELL_IN) * plots.DPI),
    )


def test_variant_rows_cover_classes_and_use_partners_of_the_right_class():
    source = FakeSource()
    rows = show_variants.variant_rows(source, n=4, seed=0)
    assert len(rows) == 4
    assert all(list(images) == list(variants.VARIANTS) for _, images in rows)
    names = [label.split(" #")[0] for label, _ in rows]
    assert set(names[:3]) == {"ant", "bee", "cat"}  # cycles through every class first
    for label, images in rows:
        index = int(label.split("#")[1])
        example = source[index]
        np.testing.assert_array_equal(images["original"], example["image"])
        # mixed_next's background stripes come from an example of the next class.
        donor = (images["mixed_next"][0, 0, 0] - 10) // 10
        assert source.info.labels[donor] == (source.info.labels[index] + 1) % 3
    again = show_variants.variant_rows(source, n=4, seed=0)
    for (_, a), (_, b) in zip(rows, again):
        np.testing.assert_array_equal(a["mixed_rand"], b["mixed_rand"])


def test_variant_grid_writes_a_png_of_the_expected_size(tmp_path):
    rows = show_variants.variant_rows(FakeSource(), n=3, seed=1)
    path = plots.variant_grid(rows, tmp_path / "sub" / "grid.png")
    with Image.open(path) as image:
        assert image.size == expected_size(3, len(variants.VARIANTS))


def test_variant_grid_rejects_ragged_rows(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="row 'b' has columns"):
        plots.variant_grid([("a", {"x": image, "y": image}), ("b", {"x": image})], tmp_path / "g")
    with pytest.raises(ValueError, match="at least one row"):
        plots.variant_grid([], tmp_path / "g.png")


def test_cli_on_the_synthetic_dataset(tmp_path):
    out = tmp_path / "grid.png"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bgjax.cli", "show-variants", "--dataset", "synthetic"]
    cmd += ["--out", str(out), "--n", "2", "--seed", "3", "--image_size", "32"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        width, height = image.size
    expected_w, expected_h = expected_size(2, len(variants.VARIANTS))
    assert width / height == pytest.approx(expected_w / expected_h, rel=0.01)
