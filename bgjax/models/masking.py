"""Early and late masking, shared by every model family (Aniraj et al., ICCVW 2023).

Early masking replaces background pixels before the network sees them; late masking multiplies a
feature map (or patch-token grid) by the foreground mask, downsampled nearest-neighbour, so
features and gradients of background positions are exactly zero from there on. The downsampling
rule is PyTorch's `nearest-exact` (each cell reads its centre pixel), as in the paper's released
code, for ConvNeXt feature maps and ViT token grids alike; torch's legacy `nearest` (top-left
pixel, half a cell off) is available for comparison.

Images here are already normalised NHWC; masks are (B, H, W) foreground in input pixels (0/1,
any dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Strategies every family supports; a family may add its own (ViT: "attn").
MASKING_STRATEGIES = ("none", "early", "late")
EARLY_FILLS = ("black", "mean")
LATE_POOLS = ("mean", "masked_mean")


def check_strategy(masking: str, allowed: Sequence[str] = MASKING_STRATEGIES) -> None:
    """Raise a ValueError if `masking` is not one of `allowed`."""
    if masking not in allowed:
        raise ValueError(f"unknown masking {masking!r}; expected one of {tuple(allowed)}")


def check_late_options(late_pool: str, late_stage: int | None = None) -> None:
    """Raise a ValueError for an unknown late pooling or (CNNs) a late stage other than 3 or 4:
    the masking paper masks the output of stage 3 or of stage 4."""
    if late_pool not in LATE_POOLS:
        raise ValueError(f"unknown late_pool {late_pool!r}; expected {LATE_POOLS}")
    if late_stage is not None and late_stage not in (3, 4):
        raise ValueError(f"late_stage must be 3 or 4, got {late_stage!r}")


def check_mask(x, mask, masking: str) -> None:
    """Validate the (image, mask) pair a model is called with, for masking strategy `masking`.

    Shapes are static under jit, so this costs nothing at run time.
    """
    if masking == "none":
        if mask is not None:
            raise ValueError(
                "a mask was given but the model was built with masking='none'; "
                "build it with masking='early' or 'late', or call it without a mask"
            )
        return
    if mask is None:
        raise ValueError(
            f"masking={masking!r} needs a foreground mask of shape {tuple(x.shape[:3])}"
        )
    if tuple(mask.shape) != tuple(x.shape[:3]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match images {tuple(x.shape)}: "
            f"expected (B, H, W) = {tuple(x.shape[:3])}"
        )


def early_fill_value(
    kind: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    in_chans: int | None = None,
):
    """Per-channel fill in *normalised* space: "black" is pixel 0, i.e. -mean/std; "mean" is 0.
    With `in_chans`, the statistics must have one value per input channel."""
    if kind not in EARLY_FILLS:
        raise ValueError(f"unknown early_fill {kind!r}; expected one of {EARLY_FILLS}")
    mean = np.asarray(pixel_mean, np.float32)
    std = np.asarray(pixel_std, np.float32)
    if mean.shape != std.shape:
        raise ValueError(f"pixel_mean {mean.shape} and pixel_std {std.shape} differ in shape")
    if in_chans is not None and mean.shape != (in_chans,):
        raise ValueError(f"pixel_mean/pixel_std have {mean.size} values, not {in_chans}")
    return -mean / std if kind == "black" else np.zeros_like(mean)


def early_mask(x, mask, fill):
    """Replace background pixels of normalised NHWC `x` by the per-channel `fill`."""
    m = jnp.asarray(mask, x.dtype)[..., None]
    return x * m + jnp.asarray(fill, x.dtype) * (1 - m)


NEAREST_MODES = ("nearest-exact", "nearest")


def nearest_indices(in_size: int, out_size: int, mode: str = "nearest-exact") -> np.ndarray:
    """Source index of each output position, by torch's `nearest-exact` or `nearest` rule.

    torch computes `min(floor((dst + offset) * (in / out)), in - 1)` in float32 with offset 0.5
    (`nearest-exact`) or 0 (`nearest`); we do the same in NumPy so odd ratios pick the very
    same pixels.
    """
    if mode not in NEAREST_MODES:
        raise ValueError(f"unknown nearest mode {mode!r}; expected one of {NEAREST_MODES}")
    offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor((np.arange(out_size, dtype=np.float32) + offset) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_mask_nearest(mask, size: tuple[int, int], mode: str = "nearest-exact"):
    """Nearest resize of (B, H, W) `mask` to (B, h, w), like `F.interpolate(mode=mode)`."""
    h, w = size
    rows = nearest_indices(mask.shape[1], h, mode)
    cols = nearest_indices(mask.shape[2], w, mode)
    return jnp.asarray(mask)[:, rows][:, :, cols]


def late_mask(features, mask):
    """Multiply NHWC `features` by `mask` resized to their grid; returns (masked, grid mask)."""
    grid = resize_mask_nearest(mask, features.shape[1:3]).astype(features.dtype)
    return features * grid[..., None], grid


def masked_mean_pool(features, grid):
    """Mean of NHWC `features` over foreground positions of `grid` (B, h, w).

    An all-background sample divides by 1 instead of 0 and so pools to zeros, not NaN.
    """
    grid = grid.astype(features.dtype)
    total = jnp.sum(features * grid[..., None], axis=(1, 2))
    count = jnp.sum(grid, axis=(1, 2))[:, None]
    return total / jnp.maximum(count, 1)


def patch_grid_mask(mask, patch_size: int, grid: Sequence[int], rule: str = "centre"):
    """(B, H, W) pixel mask -> (B, h, w) float token mask for a `patch_size` patch grid.

    rule "centre": the patch's centre pixel (torch `nearest-exact`, the paper's code);
    "any": 1 if any pixel of the patch is foreground. Pixels past the grid (dropped by the
    patch embedding) are ignored.
    """
    h, w = grid
    p = patch_size
    mask = jnp.asarray(mask)[:, : h * p, : w * p].astype(jnp.float32)
    if rule == "centre":
        return resize_mask_nearest(mask, (h, w))
    if rule == "any":
        return jnp.max(mask.reshape(mask.shape[0], h, p, w, p), axis=(2, 4))
    raise ValueError(f"unknown token-grid rule {rule!r}; expected 'centre' or 'any'")
