"""Augmentation: image and mask move together, masks stay binary, draws follow the config."""

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from bgjax.data import augment


def _blob(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """An off-centre L-shaped mask (asymmetric, so a flip of only one of the two shows) and an
    image that is bright exactly where the mask is 1."""
    mask = np.zeros((size, size + 8), np.uint8)  # not square: crops must handle H != W
    mask[5:30, 4:14] = 1
    mask[22:30, 4:32] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    return image, mask


def _near_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of a 0/1 boundary (where bilinear and nearest may disagree)."""
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    shifted = [
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    return np.max(shifted, axis=0) != np.min(shifted, axis=0)


def test_mask_follows_image_through_crop_and_flip():
    image, mask = _blob()
    op = augment.make(
        dict(random_resized_crop=dict(scale=(0.2, 1.0), ratio=(0.5, 2.0)), flip=True), size=32
    )
    flipped_sides = set()
    for seed in range(40):
        out_image, out_mask = op(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (32, 32, 3) and out_image.dtype == np.uint8
        assert out_mask.shape == (32, 32) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1}
        bright = out_image[..., 0] > 127
        disagree = bright != out_mask.astype(bool)
        # Bilinear (image) and nearest (mask) may differ only right at the silhouette's edge.
        assert not np.any(disagree & ~_near_edge(out_mask)), f"seed {seed}"
        assert disagree.mean() < 0.05, f"seed {seed}"
        if out_mask.any():  # the L's vertical arm is on the left unless flipped
            cols = np.flatnonzero(out_mask.any(axis=0))
            rows_of_first, rows_of_last = out_mask[:, cols[0]].sum(), out_mask[:, cols[-1]].sum()
            if rows_of_first != rows_of_last:
                flipped_sides.add(bool(rows_of_last > rows_of_first))
    assert flipped_sides == {False, True}  # both flipped and unflipped draws happened


def test_deterministic_given_generator():
    image, mask = _blob()
    image = (image // 2 + np.arange(image.size, dtype=np.uint8).reshape(image.shape) // 4).astype(
        np.uint8
    )
    cfg = dict(random_resized_crop=dict(scale=(0.3, 1.0)), flip=True, color_jitter=0.4)
    op = augment.make(cfg, size=24)
    a = op(image, mask, np.random.default_rng(7))
    b = op(image, mask, np.random.default_rng(7))
    c = op(image, mask, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_crop_box_stays_inside_and_matches_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(8, 200, size=2)
        x0, y0, x1, y1 = augment.random_resized_crop_box(
            rng, h, w, scale=(0.3, 0.9), ratio=(0.75, 1.33)
        )
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # With room to spare every box is found in the ten tries: area and aspect within the ranges
    # (up to rounding to whole pixels).
    for _ in range(300):
        x0, y0, x1, y1 = augment.random_resized_crop_box(rng, 300, 300, (0.3, 0.9), (0.75, 1.33))
        area = (x1 - x0) * (y1 - y0) / 300**2
        assert 0.29 <= area <= 0.91
        assert 0.74 <= (x1 - x0) / (y1 - y0) <= 1.35
    # Impossible aspect: the centred fallback with the ratio clipped to the range.
    assert augment.random_resized_crop_box(rng, 10, 100, (0.99, 1.0), (1.0, 1.0)) == (45, 0, 55, 10)


def test_color_jitter_changes_image_only():
    image, mask = _blob()
    image = np.clip(image.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    op = augment.make(dict(color_jitter=dict(brightness=0.5, contrast=0.5)), size=40)
    out_image, out_mask = op(image, mask, np.random.default_rng(3))
    assert out_image.shape == (40, 40, 3)
    np.testing.assert_array_equal(out_mask, augment.resize(image, mask, 40)[1])
    assert not np.array_equal(out_image, augment.resize(image, mask, 40)[0])
    assert augment.color_jitter(image, np.random.default_rng(0)) is image  # all strengths 0


def test_config_forms_and_errors():
    cfg = ml_collections.ConfigDict(
        dict(random_resized_crop=dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)), flip=True)
    )
    image, mask = _blob()
    out_image, out_mask = augment.make(cfg, 16)(image, mask, np.random.default_rng(0))
    assert out_image.shape == (16, 16, 3) and out_mask.shape == (16, 16)
    assert augment.make(None, 16) is None and augment.make({}, 16) is None
    # No crop: the whole frame is resized.
    out_image, out_mask = augment.make(dict(flip=False), 20)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out_mask, augment.resize(image, mask, 20)[1])
    with pytest.raises(ValueError, match="rotate"):
        augment.make(dict(rotate=10), 16)
    with pytest.raises(ValueError, match="scale"):
        augment.make(dict(random_resized_crop=dict(scale=(0.0, 1.0))), 16)
    with pytest.raises(ValueError, match="hue"):
        augment.make(dict(color_jitter=dict(hue=0.1)), 16)


def test_register_extension_op():
    calls = []

    def make_invert(cfg, size):
        calls.append((cfg, size))
        return lambda image, mask, rng: (255 - image, mask)

    augment.register("invert_for_test", make_invert)
    try:
        image, mask = _blob()
        out_image, _ = augment.make(dict(invert_for_test=True), 40)(image, mask, None)
        assert calls == [(True, 40)]
        np.testing.assert_array_equal(out_image, 255 - augment.resize(image, mask, 40)[0])
    finally:
        del augment._OPS["invert_for_test"]


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blurred noise: detail at several scales, so resampling kernels can be compared."""
    noise = np.random.default_rng(seed).random((height // 8 + 2, width // 8 + 2, 3))
    image = Image.fromarray((noise * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image)


@pytest.mark.parametrize("shape, size", [((60, 80), 96), ((60, 80), 24), ((90, 70), 50)])
def test_opencv_crop_matches_pil_resize(shape, size):
    """The cv2 path computes what PIL's resize(box=...) does, up to the resampling kernel: the
    image within a few grey levels on average, the mask (nearest, pixel centres) the same."""
    image, mask = _smooth_image(*shape), np.zeros(shape, np.uint8)
    mask[10:40, 15:50] = 1
    rng = np.random.default_rng(1)
    for _ in range(10):
        box = augment.random_resized_crop_box(rng, *shape, scale=(0.2, 1.0))
        out_image, out_mask = augment.resized_crop(image, mask, box, size)
        pil_image = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box)
        pil_mask = Image.fromarray(mask).resize((size, size), Image.NEAREST, box=box)
        diff = np.abs(out_image.astype(int) - np.asarray(pil_image))
        # Area averaging stays < 2 here; unfiltered INTER_LINEAR on the 2.6x downscale reaches
        # 3.1, a crop one pixel off 11.
        assert diff.mean() < 2.5, (box, diff.mean())
        assert np.mean(out_mask != np.asarray(pil_mask)) < 0.005, box
        assert set(np.unique(out_mask)) <= {0, 1}


def test_flip_mirrors_and_bool_masks_resample():
    image, mask = _smooth_image(40, 48), np.zeros((40, 48), bool)
    mask[5:30, 4:14] = True
    box = (3, 2, 41, 36)
    plain = augment.resized_crop(image, mask, box, 32)
    flipped = augment.resized_crop(image, mask, box, 32, flip=True)
    assert plain[1].dtype == np.uint8 and set(np.unique(plain[1])) == {0, 1}
    np.testing.assert_array_equal(flipped[0], plain[0][:, ::-1])
    np.testing.assert_array_equal(flipped[1], plain[1][:, ::-1])


@pytest.mark.parametrize(
    "crop", [dict(scale=(0.35, 1.0)), dict(scale=(0.08, 1.0), ratio=(0.5, 2.0)), None]
)
def test_min_source_side_keeps_every_crop_downscaled(crop):
    """From an image whose shorter side is min_source_side, no crop is smaller than the output:
    decoding reduced to that side (JPEG draft) then only changes the resampling kernel."""
    size = 32
    config = dict(random_resized_crop=crop) if crop else dict(flip=True)
    side = augment.min_source_side(config, size)
    assert side >= size
    rng = np.random.default_rng(0)
    for height, width in [(side, side), (side, 3 * side), (2 * side, side), (side, side + 1)]:
        for _ in range(200 if crop else 1):
            x0, y0, x1, y1 = (
                augment.random_resized_crop_box(rng, height, width, **crop)
                if crop
                else (0, 0, width, height)
            )
            assert min(x1 - x0, y1 - y0) >= size - 1  # - 1: boxes round to whole pixels


def _pil_color_jitter(image, rng, strength):
    """The reference: PIL's ImageEnhance, as torchvision's ColorJitter applies it to PIL images."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    pil = Image.fromarray(image)
    for i in rng.permutation(3):
        pil = enhancers[i](pil).enhance(rng.uniform(1.0 - strength, 1.0 + strength))
    return np.asarray(pil)


def test_color_jitter_matches_pil_image_enhance():
    image = _smooth_image(48, 64)
    for seed in range(12):
        ours = augment.color_jitter(image, np.random.default_rng(seed), 0.4, 0.4, 0.4)
        pil = _pil_color_jitter(image, np.random.default_rng(seed), 0.4)
        diff = np.abs(ours.astype(int) - pil)
        assert diff.max() <= 4 and diff.mean() < 0.5, (seed, diff.max(), diff.mean())
    # Brightness and contrast alone: PIL's pixels exactly.
    for factor in (0.6, 1.3):
        pil = Image.fromarray(image)
        np.testing.assert_array_equal(
            augment._brightness(image, factor), ImageEnhance.Brightness(pil).enhance(factor)
        )
        np.testing.assert_array_equal(
            augment._contrast(image, factor), ImageEnhance.Contrast(pil).enhance(factor)
        )
