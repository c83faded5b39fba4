"""Per-example augmentation that moves image and mask together.

Every geometric op (crop, resize, flip) is applied to the image AND its foreground mask, so the
mask keeps marking the object after augmentation (early/late masking and the IN-9 variants rely
on it). The image is resampled bilinearly, the mask with nearest neighbour, which keeps it binary.
Photometric ops touch the image only.

Pure NumPy + PIL (PIL's resampling is C and releases the GIL, so Grain's reader threads overlap);
deterministic given a `np.random.Generator`.

The `augment` config (a ConfigDict or dict; None = no augmentation) selects ops by key:

    dict(random_resized_crop=dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)),
         flip=True,
         color_jitter=0.4)           # or dict(brightness=.4, contrast=.4, saturation=.4); 0 = off

Ops run in a fixed order: the geometric ones first (crop and flip in one resampling pass), then
the photometric ones. Extension point: `register(name, make_op)` adds a per-example op that runs
after them (`make_op(cfg, size) -> op(image, mask, rng) -> (image, mask)`), e.g. a RandAugment
for the CUB recipe. Batch-level ops that mix examples (mixup, cutmix) do not belong
here: they act on a batch of images AND labels, so they go in the train step, on device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

# (image uint8[H,W,3], mask uint8[H,W], rng) -> (image, mask)
Op = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1), end-exclusive, drawn like torchvision's RandomResizedCrop.

    Ten tries at a box of random area fraction `scale` and aspect `ratio` (log-uniform) that fits;
    else the largest centred box whose aspect is `ratio` clipped to the image's.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def resized_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    size: int,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops `box` (x0, y0, x1, y1) out of image and mask, resizes both to size x size, and
    optionally mirrors them left-right, in one PIL pass (NumPy's negative-stride copy of an
    [H, W, 3] array is several times slower than PIL's transpose)."""
    out = (size, size)
    pil_image = Image.fromarray(image).resize(out, Image.Resampling.BILINEAR, box=box)
    pil_mask = Image.fromarray(mask).resize(out, Image.Resampling.NEAREST, box=box)
    if flip:
        pil_image = pil_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pil_mask = pil_mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(pil_image), np.asarray(pil_mask)


def resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resizes image and mask to size x size (whole frame, no crop), or returns them as they are."""
    height, width = mask.shape
    if height == width == size:
        return image, mask
    return resized_crop(image, mask, (0, 0, width, height), size)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
) -> np.ndarray:
    """torchvision-style ColorJitter, no hue: factors ~ U[max(0, 1 - s), 1 + s], random order."""
    enhancers = [
        (ImageEnhance.Brightness, brightness),
        (ImageEnhance.Contrast, contrast),
        (ImageEnhance.Color, saturation),
    ]
    enhancers = [(enhancer, s) for enhancer, s in enhancers if s > 0]
    if not enhancers:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    for i in rng.permutation(len(enhancers)):
        enhancer, strength = enhancers[i]
        pil = enhancer(pil).enhance(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
    return np.asarray(pil)


# ---------------------------------------------------------------------------------------------
# Config -> one callable. Each builder takes its config value and the output size and returns
# an Op, or None when the value switches the op off.


def _as_dict(cfg: Any) -> dict[str, Any] | None:
    """A (nested) ConfigDict or Mapping as a plain dict; None for anything else (e.g. True)."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg) if isinstance(cfg, Mapping) else None


def _geometry(crop_cfg: Any, flip: Any, size: int) -> Op:
    """Random resized crop (or the whole frame) and a coin-flip mirror, as one resampling pass."""
    crop = None
    if crop_cfg:
        crop = _as_dict(crop_cfg) or {}
        scale = tuple(crop.pop("scale", (0.08, 1.0)))
        ratio = tuple(crop.pop("ratio", (3 / 4, 4 / 3)))
        if crop:
            raise ValueError(f"augment.random_resized_crop: unknown keys {sorted(crop)}")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"augment.random_resized_crop: bad scale {scale} or ratio {ratio}")
        crop = dict(scale=scale, ratio=ratio)

    def op(image, mask, rng):
        height, width = mask.shape
        box = (0, 0, width, height)
        if crop is not None:
            box = random_resized_crop_box(rng, height, width, **crop)
        mirror = bool(flip) and rng.random() < 0.5
        if not mirror and box == (0, 0, width, height) == (0, 0, size, size):
            return image, mask
        return resized_crop(image, mask, box, size, flip=mirror)

    return op


def _color_jitter(cfg: Any, size: int) -> Op | None:
    if not cfg:
        return None
    strengths = _as_dict(cfg)
    if strengths is not None:
        unknown = set(strengths) - {"brightness", "contrast", "saturation"}
        if unknown:
            raise ValueError(f"augment.color_jitter: unknown keys {sorted(unknown)}")
    else:
        strengths = dict.fromkeys(("brightness", "contrast", "saturation"), float(cfg))
    return lambda image, mask, rng: (color_jitter(image, rng, **strengths), mask)


# Geometric ops, applied first and together (`_geometry`).
_GEOMETRY = ("random_resized_crop", "flip")
# Ops after the geometry, in this order: name -> builder(cfg, size) -> Op | None.
_OPS: dict[str, Callable[[Any, int], Op | None]] = {"color_jitter": _color_jitter}


def register(name: str, make_op: Callable[[Any, int], Op | None]) -> None:
    """Adds an op that runs after the built-in ones (e.g. RandAugment). See the module doc."""
    _OPS[name] = make_op


def make(config: Mapping[str, Any] | None, size: int) -> Op | None:
    """The augmentation `config` as one op whose outputs are always size x size; None if empty."""
    if not config:
        return None
    as_dict = _as_dict(config)
    if as_dict is None:
        raise ValueError(f"augment config must be a dict/ConfigDict of ops, got {config!r}")
    config = as_dict
    known = [*_GEOMETRY, *_OPS]
    unknown = set(config) - set(known)
    if unknown:
        raise ValueError(f"unknown augment ops {sorted(unknown)}; known: {known}")
    ops = [_geometry(config.get("random_resized_crop"), config.get("flip"), size)]
    ops += [op for name, make_op in _OPS.items() if (op := make_op(config.get(name), size))]

    def augment(image, mask, rng):
        for op in ops:
            image, mask = op(image, mask, rng)
        return resize(image, mask, size)

    return augment
