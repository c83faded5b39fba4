"""Pixel semantics of the eight IN-9 variants, partner sampling, soft-alpha compositing, errors."""

import numpy as np
import pytest

from bgjax import variants as V

H, W = 10, 12


def distinct_image(height=H, width=W, seed=0):
    """Every pixel a different colour, none black, so misplaced pixels cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    return np.stack([ys + 1, xs + 1, rng.integers(1, 256, (height, width))], axis=-1).astype(
        np.uint8
    )


def box_mask(bbox, height=H, width=W):
    x0, y0, x1, y1 = bbox
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def blob_mask():
    """A non-rectangular foreground whose tight box is (3, 2, 9, 7)."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:7, 4:8] = 1
    mask[4, 3] = 1
    mask[3, 8] = 1
    return mask


def outside(bbox, height=H, width=W):
    return ~box_mask(bbox, height, width).astype(bool)


def test_original_is_an_equal_copy():
    image = distinct_image()
    out = V.composite("original", image, blob_mask())
    np.testing.assert_array_equal(out, image)
    assert out is not image and out.dtype == np.uint8


def test_bbox_from_mask_is_tight_and_end_exclusive():
    assert V.bbox_from_mask(blob_mask()) == (3, 2, 9, 7)
    assert V.bbox_from_mask(box_mask((0, 0, W, 1))) == (0, 0, W, 1)


@pytest.mark.parametrize("bbox", [None, (1, 1, 5, 4)])
def test_only_bg_b_blacks_the_box_and_nothing_else(bbox):
    image, mask = distinct_image(), blob_mask()
    out = V.composite("only_bg_b", image, mask, bbox=bbox)
    box = V.bbox_from_mask(mask) if bbox is None else bbox
    x0, y0, x1, y1 = box
    assert (out[y0:y1, x0:x1] == 0).all()
    np.testing.assert_array_equal(out[outside(box)], image[outside(box)])


def expected_only_bg_t(image, bbox, strip):
    """Independent statement of the rule: canvas pixel (y, x) = strip[y % h, x % w]."""
    x0, y0, x1, y1 = bbox
    out = image.copy()
    for y in range(y0, y1):
        for x in range(x0, x1):
            out[y, x] = strip[y % strip.shape[0], x % strip.shape[1]]
    return out


# (bbox, the strip the reference rule picks) on a 10 x 12 image; margins (left, right, top, bottom).
ONLY_BG_T_CASES = {
    # (2, 3, 1, 1): side 3*10 > 1*12; right wider. x0 % 3 != 0, so tiling from the box origin
    # instead of (0, 0) would differ; the box is wider than the strip, so copies wrap.
    "right": ((2, 1, 9, 9), lambda im: im[:, 9:]),
    # (3, 2, 1, 1): left strictly wider than right.
    "left": ((3, 1, 10, 9), lambda im: im[:, :3]),
    # (3, 3, 1, 1): left == right is not "left > right", so the right strip.
    "left_right_tie": ((3, 1, 9, 9), lambda im: im[:, 9:]),
    # (1, 1, 1, 4): top/bottom 4*12 >= side 1*10; bottom taller; y0 % 4 != 0.
    "bottom": ((1, 1, 11, 6), lambda im: im[6:]),
    # (1, 1, 6, 1): top strictly taller.
    "top": ((1, 6, 11, 9), lambda im: im[:6]),
    # (1, 1, 3, 3): top == bottom, so the bottom strip.
    "top_bottom_tie": ((1, 3, 11, 7), lambda im: im[7:]),
    # (6, 1, 5, 1): side 6*10 == top/bottom 5*12; the side needs STRICTLY more, so the top strip.
    "side_vs_top_tie": ((6, 5, 11, 9), lambda im: im[:5]),
    # (6, 1, 4, 1): side 6*10 > 4*12, so the (left) side strip.
    "side_beats_top": ((6, 4, 11, 9), lambda im: im[:, :6]),
}


@pytest.mark.parametrize("case", sorted(ONLY_BG_T_CASES))
def test_only_bg_t_strip_choice_and_tiling(case):
    bbox, strip_of = ONLY_BG_T_CASES[case]
    image = distinct_image()
    out = V.only_bg_t(image, bbox)
    np.testing.assert_array_equal(out, expected_only_bg_t(image, bbox, strip_of(image)))
    np.testing.assert_array_equal(out[outside(bbox)], image[outside(bbox)])
    # Every filled pixel comes from outside the box.
    outside_colours = {tuple(p) for p in image[outside(bbox)]}
    x0, y0, x1, y1 = bbox
    assert all(tuple(p) in outside_colours for p in out[y0:y1, x0:x1].reshape(-1, 3))


def test_only_bg_t_via_composite_uses_the_mask_box_by_default():
    image, mask = distinct_image(), blob_mask()
    np.testing.assert_array_equal(
        V.composite("only_bg_t", image, mask), V.only_bg_t(image, V.bbox_from_mask(mask))
    )
    np.testing.assert_array_equal(
        V.composite("only_bg_t", image, mask, bbox=(2, 1, 9, 9)), V.only_bg_t(image, (2, 1, 9, 9))
    )


@pytest.mark.parametrize("dtype", [np.uint8, bool, np.int32, np.float32])
def test_no_fg_and_only_fg_are_complements(dtype):
    image, mask = distinct_image(), blob_mask()
    image[3, 5] = 0  # a black foreground pixel must not matter
    fg = mask.astype(bool)
    no_fg = V.composite("no_fg", image, mask.astype(dtype))
    only_fg = V.composite("only_fg", image, mask.astype(dtype))
    assert no_fg.dtype == only_fg.dtype == np.uint8
    assert (no_fg[fg] == 0).all() and (only_fg[~fg] == 0).all()
    np.testing.assert_array_equal(no_fg[~fg], image[~fg])
    np.testing.assert_array_equal(only_fg[fg], image[fg])
    np.testing.assert_array_equal(no_fg.astype(int) + only_fg, image)


@pytest.mark.parametrize("name", V.MIXED)
@pytest.mark.parametrize("donor_box_from", ["bg_mask", "bg_bbox"])
def test_mixed_pastes_the_foreground_with_its_mask_on_the_donor_only_bg_t(name, donor_box_from):
    image, mask = distinct_image(seed=0), blob_mask()
    image[3, 5] = 0  # black foreground pixel: kept, not replaced by background
    donor, donor_box = distinct_image(seed=1), (2, 1, 9, 9)
    donor_kw = {donor_box_from: box_mask(donor_box) if donor_box_from == "bg_mask" else donor_box}
    out = V.composite(name, image, mask, bg_image=donor, **donor_kw)
    fg = mask.astype(bool)
    np.testing.assert_array_equal(out[fg], image[fg])
    assert (out[3, 5] == 0).all()
    np.testing.assert_array_equal(out[~fg], V.only_bg_t(donor, donor_box)[~fg])


def test_mixed_donor_of_another_size_is_cropped_and_resized_to_the_image():
    image, mask = distinct_image(), blob_mask()
    donor = np.full((40, 30, 3), 77, np.uint8)  # uniform: any crop/resize of it stays 77
    out = V.composite("mixed_rand", image, mask, bg_image=donor, bg_bbox=(10, 10, 20, 30))
    fg = mask.astype(bool)
    assert out.shape == image.shape
    assert (out[~fg] == 77).all()
    np.testing.assert_array_equal(out[fg], image[fg])


def test_composite_does_not_modify_its_inputs():
    image, mask, donor = distinct_image(), blob_mask(), distinct_image(seed=2)
    before = image.copy(), mask.copy(), donor.copy()
    for name in V.VARIANTS:
        V.composite(name, image, mask, bg_image=donor, bg_mask=mask)
    for a, b in zip((image, mask, donor), before):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- partners

# Unequal class sizes (and one singleton class) so that "uniform over classes" differs from
# "uniform over examples".
LABELS = np.array([0] * 50 + [1] * 5 + [2] * 20 + [3] + [4] * 24, np.int32)
NUM_CLASSES = 5


def draw(name, n=4000, seed=0):
    sampler = V.PartnerSampler(LABELS, NUM_CLASSES)
    rng = np.random.default_rng(seed)
    index = rng.integers(len(LABELS), size=n)
    partner = np.array([sampler.sample(name, int(i), rng) for i in index])
    return index, partner


def test_mixed_same_draws_another_example_of_the_same_class():
    index, partner = draw("mixed_same")
    np.testing.assert_array_equal(LABELS[partner], LABELS[index])
    singleton = LABELS[index] == 3
    assert singleton.any() and (partner[singleton] == index[singleton]).all()
    assert (partner[~singleton] != index[~singleton]).all()
    # Every member of a class gets drawn (not always the same one).
    assert set(partner[LABELS[index] == 1]) == set(np.flatnonzero(LABELS == 1))


def test_mixed_next_draws_from_the_next_class():
    index, partner = draw("mixed_next")
    np.testing.assert_array_equal(LABELS[partner], (LABELS[index] + 1) % NUM_CLASSES)


def test_mixed_next_skips_classes_without_examples():
    sampler = V.PartnerSampler(np.array([0, 0, 2, 2, 4], np.int32), num_classes=6)
    rng = np.random.default_rng(0)
    assert sampler.labels[sampler.sample("mixed_next", 0, rng)] == 2  # class 1 is empty
    assert sampler.labels[sampler.sample("mixed_next", 4, rng)] == 0  # 5 empty, wraps to 0


def test_mixed_rand_draws_classes_uniformly():
    index, partner = draw("mixed_rand", n=5000)
    freq = np.bincount(LABELS[partner], minlength=NUM_CLASSES) / len(partner)
    np.testing.assert_allclose(freq, 1 / NUM_CLASSES, atol=0.03)  # ~5 sigma
    # Same-class draws happen (classes are uniform) but never pick the example itself,
    # except in the singleton class.
    self_draws = partner == index
    assert (LABELS[index[self_draws]] == 3).all()


@pytest.mark.parametrize("name", V.MIXED)
def test_partner_sampling_is_deterministic_under_a_seed(name):
    np.testing.assert_array_equal(draw(name, n=200, seed=5)[1], draw(name, n=200, seed=5)[1])
    assert not np.array_equal(draw(name, n=200, seed=5)[1], draw(name, n=200, seed=6)[1])


def test_partner_index_matches_the_sampler():
    sampler = V.PartnerSampler(LABELS, NUM_CLASSES)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    for i in range(0, len(LABELS), 7):
        for name in V.MIXED:
            expected = sampler.sample(name, i, rng_a)
            assert V.partner_index(name, LABELS, i, rng_b, NUM_CLASSES) == expected


# ----------------------------------------------------------------------------- soft alpha


def test_alpha_composite_blends_per_pixel():
    image = distinct_image()
    background = distinct_image(seed=9)
    alpha = np.zeros((H, W), np.float32)
    alpha[:, :4] = 1.0
    alpha[:, 4:8] = 0.5
    out = V.alpha_composite(image, alpha, background)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :4], image[:, :4])
    np.testing.assert_array_equal(out[:, 8:], background[:, 8:])
    mean = (image[:, 4:8].astype(float) + background[:, 4:8]) / 2
    assert np.abs(out[:, 4:8] - mean).max() <= 0.5


@pytest.mark.parametrize("background_shape", [(20, 72), (72, 24)])
def test_alpha_composite_centre_crops_the_background_to_the_image_aspect(background_shape):
    # A band across the middle third of the long axis: the centre crop for a 10x12 image (20x24)
    # lies inside it, so the bilinear resize of the uniform crop returns the band value; any
    # stretch or off-centre crop would bring in the 200 border.
    bh, bw = background_shape
    background = np.full((bh, bw, 3), 200, np.uint8)
    if bw > bh:
        background[:, 24:48] = 50
    else:
        background[24:48] = 50
    out = V.alpha_composite(distinct_image(), np.zeros((H, W), np.float32), background)
    assert out.shape == (H, W, 3)
    assert (out == 50).all()


# ----------------------------------------------------------------------------- bad input


def bad_input_cases():
    image, mask = distinct_image(), blob_mask()
    return {
        "mask_shape": (lambda: V.composite("no_fg", image, mask[:5]), r"mask shape \(5, 12\)"),
        "image_dtype": (
            lambda: V.composite("no_fg", image.astype(np.float32), mask),
            "uint8.*float32",
        ),
        "image_channels": (lambda: V.composite("no_fg", image[..., :1], mask), r"\(10, 12, 1\)"),
        "empty_mask": (lambda: V.composite("only_fg", image, 0 * mask), "empty mask"),
        "empty_mask_box": (lambda: V.composite("only_bg_t", image, 0 * mask), "empty mask"),
        "mask_values": (lambda: V.composite("no_fg", image, 2 * mask), r"values.*\{0, 1\}.*2"),
        "bbox_outside": (
            lambda: V.composite("only_bg_b", image, mask, bbox=(0, 0, 13, 5)),
            r"outside the image \(H=10, W=12\)",
        ),
        "bbox_empty": (lambda: V.only_bg_t(image, (4, 2, 4, 6)), r"\(4, 2, 4, 6\) is empty"),
        "mixed_without_donor": (
            lambda: V.composite("mixed_same", image, mask),
            "'mixed_same' needs a background donor",
        ),
        "unknown_variant": (
            lambda: V.composite("only_bg", image, mask),
            "unknown variant 'only_bg'.*only_bg_b, only_bg_t",
        ),
        "no_margin": (lambda: V.only_bg_t(image, (0, 0, W, H)), "covers the whole 10x12 image"),
        "donor_mask_shape": (
            lambda: V.composite("mixed_next", image, mask, bg_image=image, bg_mask=mask[:, :3]),
            r"bg_mask shape \(10, 3\)",
        ),
        "alpha_dtype": (
            lambda: V.alpha_composite(image, mask * 255, image),
            r"alpha must be float.*uint8",
        ),
        "alpha_range": (
            lambda: V.alpha_composite(image, mask * 2.0, image),
            r"\[0, 1\], got range \[0.0, 2.0\]",
        ),
        "not_mixed": (
            lambda: V.PartnerSampler(LABELS).sample("no_fg", 0, np.random.default_rng()),
            "'no_fg' is not a mixed variant",
        ),
    }


@pytest.mark.parametrize("case", sorted(bad_input_cases()))
def test_bad_input_raises_a_clear_value_error(case):
    call, message = bad_input_cases()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_composite_mask_is_empty_only_where_the_foreground_was_removed():
    mask = np.zeros((6, 6), np.uint8)
    mask[2:4, 1:5] = 1
    for name in V.VARIANTS:
        out = V.composite_mask(name, mask)
        assert out.shape == mask.shape and out.dtype == mask.dtype
        expected = np.zeros_like(mask) if name in ("only_bg_b", "only_bg_t", "no_fg") else mask
        np.testing.assert_array_equal(out, expected, err_msg=name)
    with pytest.raises(ValueError, match="unknown variant"):
        V.composite_mask("only_bg", mask)
