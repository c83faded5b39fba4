"""The masking helpers shared by ConvNeXt and ViT (bgjax/models/masking.py)."""

import numpy as np
import pytest

from bgjax.models import masking

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((64, 64), (16, 16)), ((64, 48), (7, 5)), ((224, 224), (7, 7)), ((37, 50), (5, 14)),
     ((10, 10), (20, 15)), ((518, 518), (37, 37)), ((8, 8), (8, 8))],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["nearest-exact", "nearest"])
def test_resize_mask_nearest_matches_torch(in_hw, out_hw, mode):
    torch = pytest.importorskip("torch")
    mask = (np.random.default_rng(0).random((2, *in_hw)) > 0.5).astype(np.float32)
    ours = np.asarray(masking.resize_mask_nearest(mask, out_hw, mode))
    ref = torch.nn.functional.interpolate(torch.from_numpy(mask)[:, None], out_hw, mode=mode)
    np.testing.assert_array_equal(ours, ref[:, 0].numpy())


def test_resize_mask_nearest_integer_ratio_takes_centre_or_top_left_pixel():
    mask = np.random.default_rng(1).integers(0, 2, (1, 12, 8)).astype(np.uint8)
    out = np.asarray(masking.resize_mask_nearest(mask, (3, 2)))
    np.testing.assert_array_equal(out, mask[:, 2::4, 2::4])
    assert out.dtype == np.uint8
    legacy = np.asarray(masking.resize_mask_nearest(mask, (3, 2), "nearest"))
    np.testing.assert_array_equal(legacy, mask[:, ::4, ::4])


def test_early_fill_value():
    np.testing.assert_allclose(
        masking.early_fill_value("black", MEAN, STD), -np.asarray(MEAN) / np.asarray(STD), 1e-6
    )
    np.testing.assert_array_equal(masking.early_fill_value("mean", MEAN, STD), np.zeros(3))
    with pytest.raises(ValueError, match="early_fill 'grey'"):
        masking.early_fill_value("grey", MEAN, STD)
    assert masking.early_fill_value("black", MEAN, STD, in_chans=3).shape == (3,)
    with pytest.raises(ValueError, match="have 3 values, not 1"):
        masking.early_fill_value("black", MEAN, STD, in_chans=1)


def test_late_options_are_checked():
    masking.check_late_options("masked_mean", late_stage=4)
    with pytest.raises(ValueError, match="unknown late_pool 'max'"):
        masking.check_late_options("max")
    with pytest.raises(ValueError, match="late_stage must be 3 or 4, got 2"):
        masking.check_late_options("mean", late_stage=2)


def test_early_mask_replaces_only_background():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
    mask = rng.integers(0, 2, (2, 6, 5)).astype(np.uint8)
    fill = masking.early_fill_value("black", MEAN, STD)
    out = np.asarray(masking.early_mask(x, mask, fill))
    fg = mask.astype(bool)
    np.testing.assert_array_equal(out[fg], x[fg])
    np.testing.assert_allclose(out[~fg], np.broadcast_to(fill, out[~fg].shape), rtol=1e-6)


def test_late_mask_and_masked_mean_pool():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((3, 4, 4, 5)).astype(np.float32) + 2.0
    mask = np.zeros((3, 16, 16), np.float32)
    mask[0] = 1
    mask[1, :8, :8] = 1  # top-left quarter
    masked, grid = masking.late_mask(features, mask)
    masked, grid = np.asarray(masked), np.asarray(grid)
    np.testing.assert_array_equal(masked[grid == 0], 0)
    np.testing.assert_array_equal(masked[grid == 1], features[grid == 1])
    pooled = np.asarray(masking.masked_mean_pool(masked, grid))
    np.testing.assert_allclose(pooled[0], features[0].mean((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(pooled[1], features[1, :2, :2].mean((0, 1)), rtol=1e-5)
    np.testing.assert_array_equal(pooled[2], 0)  # empty mask: zeros, not NaN


def test_check_mask_errors():
    x = np.zeros((2, 8, 8, 3), np.float32)
    good = np.ones((2, 8, 8), np.uint8)
    masking.check_mask(x, None, "none")
    masking.check_mask(x, good, "early")
    with pytest.raises(ValueError, match=r"mask shape \(2, 4, 4\).*\(2, 8, 8, 3\)"):
        masking.check_mask(x, np.ones((2, 4, 4)), "late")
    with pytest.raises(ValueError, match="masking='none'"):
        masking.check_mask(x, good, "none")
    with pytest.raises(ValueError, match=r"masking='early' needs a foreground mask"):
        masking.check_mask(x, None, "early")
    with pytest.raises(ValueError, match="unknown masking 'middle'"):
        masking.check_strategy("middle")
    assert set(masking.MASKING_STRATEGIES) == {"none", "early", "late"}
