"""Helpers for tests that compare our models with timm's.

timm's default init hides bugs (layer-scale 1e-6, zero biases, unit norms), so parity tests first
fill *every* tensor with deterministic random values of a sane scale
(docs/reference.md#timm-parity).
"""

from __future__ import annotations

import numpy as np
import pytest


def require_timm():
    """The `timm` module, or skip the calling test when torch/timm are not installed."""
    pytest.importorskip("torch")
    from timm_compat import import_timm

    try:
        return import_timm()
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"timm unavailable: {e}")


def timm_model(name: str, **kwargs):
    """`timm.create_model(name, pretrained=False, **kwargs)` in eval mode (skips without timm)."""
    timm = require_timm()
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _random_like(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("running_var"):
        return rng.uniform(0.5, 1.5, shape)
    if len(shape) >= 2:
        # Weights and embeddings: unit-variance outputs keep deep stacks finite.
        fan_in = int(np.prod(shape[1:])) if shape[0] > 1 else shape[-1]
        return rng.standard_normal(shape) / np.sqrt(fan_in)
    if name.endswith("bias") or name.endswith("running_mean"):
        return 0.1 * rng.standard_normal(shape)
    # Norm scales, layer-scale gammas and other 1-D multipliers: around 1, never all equal.
    return 1.0 + 0.25 * rng.standard_normal(shape)


def randomize_torch_model(model, seed: int = 0):
    """Fill every floating tensor of `model`'s state dict with seeded random values, in place.

    The same (architecture, seed) always gives the same tensors. Returns the model.
    """
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            value = _random_like(name, tuple(tensor.shape), rng)
            tensor.copy_(torch.from_numpy(np.asarray(value, np.float32)))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """A torch model's state dict as float32 NumPy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def torch_forward(fn, x_nhwc: np.ndarray) -> np.ndarray:
    """Run torch callable `fn` on NHWC NumPy images (as NCHW); NCHW outputs come back NHWC."""
    import torch

    with torch.no_grad():
        out = fn(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    out = out.detach().float().numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking NHWC float32 images."""
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def masked_batch(size: int, corner: int) -> tuple[np.ndarray, np.ndarray]:
    """Four images and (4, size, size) foreground masks: a box in the first three, the
    bottom-right corner from `corner` on in the last (a foreground off the box's cells)."""
    mask = np.zeros((4, size, size), np.float32)
    mask[:3, 8:40, 16:56] = 1
    mask[3, corner:, corner:] = 1
    return random_images(4, size, seed=1), mask
