"""ViT position embeddings: timm's bicubic `resample_abs_pos_embed` as matrices (traceable, any
grid to any grid) and the fixed 2-D sine-cosine table (MoCo v3, MAE, big_vision)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """[out, in] weights reproducing torch's 1-D bicubic resize (align_corners=False).

    antialias=False: `F.interpolate(mode="bicubic")`: a = -0.75, 4 taps, indices clamped.
    antialias=True: torch's PIL-style filter: a = -0.5, support widened by the downscale
    factor, weights renormalised over in-range taps.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        src = (rows + 0.5) * scale - 0.5
        base = np.floor(src)
        for tap in range(-1, 3):
            idx = np.clip(base + tap, 0, in_size - 1).astype(int)
            np.add.at(weights, (rows, idx), _cubic(src - (base + tap), -0.75))
        return weights
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def resample_pos_embed(
    pos_embed,
    new_grid: Sequence[int],
    old_grid: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    *,
    antialias: bool = False,
):
    """Bicubic resize of a [1, prefix + h*w, D] position embedding to `new_grid` (h', w').

    Equal to timm's `resample_abs_pos_embed` with the same `antialias` (timm's own default
    there is True); prefix rows (class/register slots) are kept as they are. `old_grid` None
    means square. NumPy in, NumPy out (for converters); jax arrays stay jax (traceable).
    """
    num_pos = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_pos)
        if side * side != num_pos:
            raise ValueError(
                f"pos_embed has {num_pos} grid rows (after {num_prefix_tokens} prefix), not a "
                "square: pass old_grid"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != num_pos:
        raise ValueError(f"pos_embed has {num_pos} grid rows, old_grid {old_grid} needs more")
    if old_grid == new_grid:
        return pos_embed
    xp = np if isinstance(pos_embed, np.ndarray) else jnp
    rows = bicubic_matrix(old_grid[0], new_grid[0], antialias=antialias)
    cols = bicubic_matrix(old_grid[1], new_grid[1], antialias=antialias)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_grid, -1).astype(xp.float32)
    kw = {} if xp is np else {"precision": jax.lax.Precision.HIGHEST}
    rows, cols = (xp.asarray(m, xp.float32) for m in (rows, cols))
    grid = xp.einsum("hH,wW,bHWd->bhwd", rows, cols, grid, **kw)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos_embed.dtype)
    return xp.concatenate([prefix, grid], axis=1)


def sincos_2d_pos_embed(grid_size: Sequence[int], dim: int, temperature: float = 10_000.0):
    """The 2-D sine-cosine position table, (h*w, dim) row-major over the grid: a quarter of the
    channels each for sin/cos of x and of y, frequencies geometric in [1/temperature, 1]."""
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs embed_dim divisible by 4: {dim}")
    h, w = grid_size
    y, x = np.mgrid[:h, :w].astype(np.float64)
    omega = 1.0 / temperature ** (np.arange(dim // 4) / max(dim // 4 - 1, 1))
    ang_x, ang_y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    table = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
    return table.astype(np.float32)


def fit_pos_embed(model, state_dict: Mapping, *, antialias: bool = False) -> dict:
    """A timm state dict whose (square-grid) `pos_embed` is resampled to the grid of `model`
    (a `vit.VisionTransformer`), prefix rows kept. antialias=True is how timm's
    `checkpoint_filter_fn` loads pretrained weights at another resolution (its default);
    False matches the model's own on-the-fly resampling (`pos_embed_antialias` False)."""
    if "pos_embed" not in state_dict:
        raise ValueError("state dict has no 'pos_embed' key")
    pos = np.asarray(state_dict["pos_embed"])
    try:
        fitted = resample_pos_embed(
            pos, model.grid_size, None, model.num_pos_prefix_tokens, antialias=antialias
        )
    except ValueError as e:
        raise ValueError(
            f"pos_embed {pos.shape} cannot be fitted to grid {model.grid_size}: {e}"
        ) from e
    return {**state_dict, "pos_embed": fitted}
