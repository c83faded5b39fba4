"""Per-example augmentation that moves image and mask together.

Every geometric op (crop, resize, flip) is applied to the image AND its foreground mask, so the
mask keeps marking the object after augmentation (early/late masking and the IN-9 variants rely
on it). The image is resampled bilinearly (area-averaged when the crop shrinks), the mask with
nearest neighbour, which keeps it binary and aligned with the image (both use pixel centres).
Photometric ops touch the image only. Deterministic given a `np.random.Generator`.

Resampling and colour jitter are OpenCV's (cv2.resize on a view of the crop: no copy, no float
image), ~5x faster than PIL's `resize(box=...)` and ImageEnhance at 224 px, which were the floor
of the training input pipeline (cv2 releases the GIL, so Grain's reader threads overlap). OpenCV
(opencv-python-headless) is a hard dependency rather than an optional one with a PIL fallback:
it is a wheel on every platform JAX supports, and one resampling path keeps a seed's augmented
pixels the same on every install (a fallback would change them with the environment).

The `augment` config (a ConfigDict or dict; None = no augmentation) selects ops by key:

    dict(random_resized_crop=dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                                  interpolation="bilinear"),   # or "bicubic" (timm's)
         flip=True,
         color_jitter=0.4,           # or dict(brightness=.4, contrast=.4, saturation=.4); 0 = off
         rand_augment="rand-m9-mstd0.5-inc1",        # timm's RandAugment, `randaugment.py`
         random_erasing=dict(prob=0.25, mode="pixel"))   # timm's RandomErasing

Ops run in timm's order: crop and flip (one resampling pass), colour jitter, RandAugment (its
rotate/shear/translate move the mask too), random erasing (image only, like every photometric
op). As in timm's `create_transform`, colour jitter and RandAugment exclude each other.
Extension point: `register(name, make_op)` adds a per-example op that runs after them
(`make_op(cfg, size) -> op(image, mask, rng) -> (image, mask)`). Batch-level ops that mix examples
(mixup, cutmix) do not belong here: they act on a batch of images AND labels, so they go in the
train step, on device.

Evaluation does not augment; `eval_resize` maps a whole image to the model's size by the
`data.eval_resize` rule: "warp" (the whole frame squashed to size x size) or "resize_crop"
(timm's eval transform: shorter side to floor(size / crop_pct), then a centre size x size crop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np
from PIL import Image

from bgjax.data import randaugment

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


INTERPOLATIONS = ("bilinear", "bicubic")


def resized_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    size: int | tuple[int, int],
    flip: bool = False,
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Crops `box` (x0, y0, x1, y1) out of image and mask, resizes both to `size` (a side, or
    (width, height)), and optionally mirrors them left-right.

    interpolation="bicubic" resamples the image with PIL's antialiased bicubic, which is what
    timm/torchvision do to a PIL image (the masking paper's recipe); slower than the default.

    Only the crop is resampled (a view, never copied). The image is bilinear when the crop grows
    in either axis and area-averaged when it shrinks in both: INTER_LINEAR alone reads 2 x 2
    pixels per output pixel and would alias a downscale, where PIL's bilinear widens its kernel;
    area averaging is OpenCV's antialiased equivalent. The mask is nearest-exact (pixel-centre
    sampling like PIL's NEAREST; INTER_NEAREST would shift it by up to half a pixel).
    """
    x0, y0, x1, y1 = box
    out = (size, size) if isinstance(size, int) else tuple(size)
    if interpolation == "bicubic":
        image = np.asarray(Image.fromarray(image).resize(out, Image.Resampling.BICUBIC, box=box))
    elif interpolation == "bilinear":
        shrinks = x1 - x0 > out[0] and y1 - y0 > out[1]
        flag = cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR
        image = cv2.resize(image[y0:y1, x0:x1], out, interpolation=flag)
    else:
        raise ValueError(f"interpolation {interpolation!r}; known: {INTERPOLATIONS}")
    mask = mask[y0:y1, x0:x1]
    if mask.dtype != np.uint8:  # cv2 does not resample bool masks
        mask = mask.astype(np.uint8)
    mask = cv2.resize(mask, out, interpolation=cv2.INTER_NEAREST_EXACT)
    if flip:  # cv2.flip copies ~20x faster than NumPy's negative-stride copy
        image, mask = cv2.flip(image, 1), cv2.flip(mask, 1)
    return image, mask


def resize(
    image: np.ndarray, mask: np.ndarray, size: int, interpolation: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Resizes image and mask to size x size (whole frame, no crop), or returns them as they are."""
    height, width = mask.shape
    if height == width == size:
        return image, mask
    return resized_crop(image, mask, (0, 0, width, height), size, interpolation=interpolation)


EVAL_RESIZE_RULES = ("warp", "resize_crop")


def eval_resize(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rule: str = "warp",
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask at size x size for evaluation, by `rule` (see the module doc).

    "resize_crop" is timm's `transforms_factory` eval path with torchvision's arithmetic: the
    shorter side becomes floor(size / crop_pct) (256 for 224 at 0.875), the longer one
    int(scale * long / short), then the centre crop starts at round((side - size) / 2).
    """
    if rule == "warp":
        return resize(image, mask, size, interpolation)
    if rule != "resize_crop":
        raise ValueError(f"data.eval_resize {rule!r}; known: {EVAL_RESIZE_RULES}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    height, width = mask.shape
    scale = math.floor(size / crop_pct)
    if height <= width:
        out = (int(scale * width / height), scale)
    else:
        out = (scale, int(scale * height / width))
    if out != (width, height):
        image, mask = resized_crop(image, mask, (0, 0, width, height), out, False, interpolation)
    top, left = int(round((out[1] - size) / 2)), int(round((out[0] - size) / 2))
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
) -> np.ndarray:
    """torchvision-style ColorJitter, no hue: factors ~ U[max(0, 1 - s), 1 + s], random order.

    PIL ImageEnhance's definitions (blend with black, with the mean grey level, with the grey
    image) in OpenCV, ~3x faster (a 256-entry table for brightness and contrast). Brightness
    and contrast give PIL's pixels, saturation within a grey level (cv2's luma rounding); chained,
    a few pixels differ by up to 3 or 4 (a contrast pivot one level off), the mean by < 0.5.
    """
    enhancers = [(_brightness, brightness), (_contrast, contrast), (_saturation, saturation)]
    enhancers = [(enhance, s) for enhance, s in enhancers if s > 0]
    if not enhancers:
        return image
    for i in rng.permutation(len(enhancers)):
        enhance, strength = enhancers[i]
        image = enhance(image, rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
    return image


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")


def _blend_table(image: np.ndarray, centre: float, factor: float) -> np.ndarray:
    """centre + factor * (image - centre) for every grey level, in float32, truncated and clipped
    like PIL's Image.blend, applied to each channel."""
    centre, factor = np.float32(centre), np.float32(factor)
    levels = centre + factor * (np.arange(256, dtype=np.float32) - centre)
    return cv2.LUT(image, np.clip(np.trunc(levels), 0, 255).astype(np.uint8))


def _brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _blend_table(image, 0.0, factor)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    mean_grey = float(np.dot(cv2.mean(image)[:3], _LUMA))
    return _blend_table(image, int(mean_grey + 0.5), factor)


def _saturation(image: np.ndarray, factor: float) -> np.ndarray:
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    # gamma -0.499: cv2 rounds to nearest; PIL truncates (a 0.5-level bias otherwise)
    return cv2.addWeighted(image, factor, grey, 1.0 - factor, -0.499)


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.5,
    mode: str = "const",
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] = (0.229, 0.224, 0.225),
) -> np.ndarray:
    """timm's RandomErasing (one box, `max_count=1`) on a uint8 image; the mask is untouched.

    timm erases the normalised tensor with N(0, 1) per pixel ("pixel"), per box ("rand") or 0
    ("const"). Here images are uint8 until normalisation on device, so that value v is written
    as round(255 * (mean + std * v)), clipped to [0, 255]: exact for "const", and the noise of
    "pixel"/"rand" is cut at about +-2 std (the normalised value's range of a real image).
    """
    if rng.random() > prob:
        return image
    height, width = image.shape[:2]
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            shape = {"pixel": (h, w, 3), "rand": (1, 1, 3), "const": None}[mode]
            values = np.zeros((1, 1, 3)) if shape is None else rng.standard_normal(shape)
            values = 255.0 * (np.asarray(mean) + np.asarray(std) * values)
            image = image.copy()
            image[top : top + h, left : left + w] = np.clip(np.rint(values), 0, 255)
            return image
    return image


# ---------------------------------------------------------------------------------------------
# Config -> one callable. Each builder takes its config value and the output size and returns
# an Op, or None when the value switches the op off.


def _as_dict(cfg: Any) -> dict[str, Any] | None:
    """A (nested) ConfigDict or Mapping as a plain dict; None for anything else (e.g. True)."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg) if isinstance(cfg, Mapping) else None


def _crop_config(crop_cfg: Any) -> dict[str, tuple[float, float]] | None:
    """The random_resized_crop config as dict(scale, ratio) with defaults; None when off."""
    if not crop_cfg:
        return None
    crop = _as_dict(crop_cfg) or {}
    scale = tuple(crop.pop("scale", (0.08, 1.0)))
    ratio = tuple(crop.pop("ratio", (3 / 4, 4 / 3)))
    interpolation = crop.pop("interpolation", "bilinear")
    if crop:
        raise ValueError(f"augment.random_resized_crop: unknown keys {sorted(crop)}")
    if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"augment.random_resized_crop: bad scale {scale} or ratio {ratio}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"augment.random_resized_crop.interpolation {interpolation!r}; known {INTERPOLATIONS}"
        )
    return dict(scale=scale, ratio=ratio, interpolation=interpolation)


def min_source_side(config: Mapping[str, Any] | None, size: int) -> int:
    """The shorter image side from which every crop this config draws is still downscaled to
    `size` (so a JPEG may be decoded reduced to it, `imagefiles.read_rgb(min_side=...)`, changing
    only the resampling kernel). Without a crop it is `size`: the whole frame is resized.

    A crop's sides are >= sqrt(area * min_scale) * min(sqrt(min_ratio), 1 / sqrt(max_ratio))
    and area >= shorter_side^2; the centred fallback box is bounded by the ratio range alone.
    """
    crop = _crop_config((_as_dict(config) or {}).get("random_resized_crop"))
    if crop is None:
        return size
    (min_scale, _), (min_ratio, max_ratio) = crop["scale"], crop["ratio"]
    aspect = min(math.sqrt(min_ratio), 1 / math.sqrt(max_ratio))
    fraction = min(math.sqrt(min_scale) * aspect, min_ratio, 1 / max_ratio, 1.0)
    return math.ceil(size / fraction)


def _geometry(crop_cfg: Any, flip: Any, size: int) -> Op:
    """Random resized crop (or the whole frame) and a coin-flip mirror, as one resampling pass."""
    crop = _crop_config(crop_cfg)
    interpolation = "bilinear" if crop is None else crop.pop("interpolation")

    def op(image, mask, rng):
        height, width = mask.shape
        box = (0, 0, width, height)
        if crop is not None:
            box = random_resized_crop_box(rng, height, width, **crop)
        mirror = bool(flip) and rng.random() < 0.5
        if not mirror and box == (0, 0, width, height) == (0, 0, size, size):
            return image, mask
        return resized_crop(image, mask, box, size, flip=mirror, interpolation=interpolation)

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


def _rand_augment(cfg: Any, size: int) -> Op | None:
    return randaugment.make(cfg) if cfg else None


_ERASING_KEYS = {"prob", "mode", "min_area", "max_area", "min_aspect", "mean", "std"}


def _random_erasing(cfg: Any, size: int) -> Op | None:
    if not cfg:
        return None
    kwargs = _as_dict(cfg)
    if kwargs is None:
        kwargs = dict(prob=float(cfg), mode="pixel")  # a bare probability: timm train.py's mode
    unknown = set(kwargs) - _ERASING_KEYS
    if unknown:
        raise ValueError(f"augment.random_erasing: unknown keys {sorted(unknown)}")
    if kwargs.get("mode", "const") not in ("const", "rand", "pixel"):
        raise ValueError(f"augment.random_erasing.mode {kwargs['mode']!r}; known const|rand|pixel")
    if kwargs.get("prob", 0.5) <= 0:
        return None
    return lambda image, mask, rng: (random_erasing(image, rng, **kwargs), mask)


# Geometric ops, applied first and together (`_geometry`).
_GEOMETRY = ("random_resized_crop", "flip")
# Ops after the geometry, in this order: name -> builder(cfg, size) -> Op | None.
_OPS: dict[str, Callable[[Any, int], Op | None]] = {
    "color_jitter": _color_jitter,
    "rand_augment": _rand_augment,
    "random_erasing": _random_erasing,
}


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
    if config.get("color_jitter") and config.get("rand_augment"):
        raise ValueError(
            "augment.color_jitter and augment.rand_augment are both on; timm's create_transform "
            "turns colour jitter off when RandAugment is on: set color_jitter=0"
        )
    ops = [_geometry(config.get("random_resized_crop"), config.get("flip"), size)]
    ops += [op for name, make_op in _OPS.items() if (op := make_op(config.get(name), size))]

    def augment(image, mask, rng):
        for op in ops:
            image, mask = op(image, mask, rng)
        return resize(image, mask, size)

    return augment
