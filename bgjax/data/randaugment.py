"""timm's RandAugment (`rand_augment_transform`), mask-aware: the geometric ops move the mask.

The masking paper (Aniraj et al., ICCVW 2023) trains with timm's `create_transform`, whose
RandAugment is configured by a string such as `rand-m9-mstd0.5-inc1`: magnitude 9 (of 10),
magnitude noise N(0, 0.5) per op, the "increasing" op variants (a larger magnitude is always a
stronger change), 2 ops per image drawn with replacement, each applied with probability 0.5.
This module follows timm's `auto_augment.py` (op list, magnitude -> argument mapping, PIL ops,
fill colour, interpolation; docs/reference.md#timm-transforms) with two changes bgjax needs:

- Rotate, ShearX/Y and TranslateX/YRel move the foreground mask by the same affine map
  (nearest neighbour, filled with 0 = background); every other op leaves the mask untouched.
- Every draw comes from the example's `np.random.Generator` (timm uses Python's global
  `random`), so a pipeline seed fixes the augmentation.

Config: `augment.rand_augment` is a timm string ("rand-m9-mstd0.5-inc1"; sections m, n, mstd,
mmax, inc, p) or a dict dict(policy="rand-...", interpolation="bicubic", fill=(124, 116, 104)).
The fill default is timm's: round(255 * ImageNet mean).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0  # timm: magnitude M is the fraction M / 10 of each op's range
IMAGENET_FILL = (124, 116, 104)  # timm's img_mean hparam: round(255 * ImageNet mean)

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (Cutout is timm's random erasing).
ORIGINAL_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """A parsed RandAugment config (timm's defaults where the string is silent)."""

    magnitude: float = _LEVEL_DENOM
    num_layers: int = 2
    magnitude_std: float = 0.0  # inf: magnitude ~ U(0, magnitude)
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5
    interpolation: str = "bicubic"
    fill: tuple[int, int, int] = IMAGENET_FILL

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS


def parse(config: Any) -> Policy:
    """A `Policy` from timm's string or dict(policy=..., interpolation=..., fill=...)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    options: dict[str, Any] = {}
    if isinstance(config, Mapping):
        options = dict(config)
        config = options.pop("policy", "rand-m9-mstd0.5-inc1")
        unknown = set(options) - {"interpolation", "fill"}
        if unknown:
            raise ValueError(f"augment.rand_augment: unknown keys {sorted(unknown)}")
        if "fill" in options:
            options["fill"] = tuple(int(v) for v in options["fill"])
    if not isinstance(config, str) or config.split("-")[0] != "rand":
        raise ValueError(f"augment.rand_augment must be a timm 'rand-...' string, got {config!r}")
    fields: dict[str, Any] = {}
    for section in config.split("-")[1:]:
        key, value = _split_section(section, config)
        if key == "mstd":
            std = float(value)
            fields["magnitude_std"] = math.inf if std > 100 else std  # timm: > 100 = uniform
        elif key == "mmax":
            fields["magnitude_max"] = float(int(value))
        elif key == "inc":
            fields["increasing"] = bool(int(value))
        elif key == "m":
            fields["magnitude"] = float(int(value))
        elif key == "n":
            fields["num_layers"] = int(value)
        elif key == "p":
            fields["prob"] = float(value)
        else:
            raise ValueError(f"augment.rand_augment {config!r}: unknown section {section!r}")
    policy = Policy(**fields, **options)
    if policy.interpolation not in _RESAMPLE:
        raise ValueError(
            f"augment.rand_augment: interpolation {policy.interpolation!r}; known {list(_RESAMPLE)}"
        )
    return policy


def _split_section(section: str, config: str) -> tuple[str, str]:
    for key in ("mstd", "mmax", "inc", "m", "n", "p"):
        if section.startswith(key) and section[len(key) :]:
            return key, section[len(key) :]
    raise ValueError(f"augment.rand_augment {config!r}: unknown section {section!r}")


# ---------------------------------------------------------------------------------------------
# Magnitude -> op argument, timm's *_level_to_arg. `negate` draws timm's random sign.


def _level_args(name: str, level: float, negate: Callable[[float], float]) -> tuple:
    fraction = level / _LEVEL_DENOM
    if name == "Rotate":
        return (negate(fraction * 30.0),)
    if name in ("ShearX", "ShearY"):
        return (negate(fraction * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (negate(fraction * 0.45),)  # timm's translate_pct default
    if name == "Posterize":
        return (int(fraction * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(fraction * 4),)
    if name == "Solarize":
        return (min(256, int(fraction * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(fraction * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(fraction * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (fraction * 1.8 + 0.1,)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return (max(0.1, 1.0 + negate(fraction * 0.9)),)
    return ()  # AutoContrast, Equalize, Invert


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    table = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(table * 3)


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    if bits <= 0:  # PosterizeIncreasing at magnitude 10: Pillow < 11 gave black, newer raises
        return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


_PHOTOMETRIC: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": ImageOps.autocontrast,
    "Equalize": ImageOps.equalize,
    "Invert": ImageOps.invert,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": ImageOps.solarize,
    "SolarizeIncreasing": ImageOps.solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, f: ImageEnhance.Color(img).enhance(f),
    "ColorIncreasing": lambda img, f: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "ContrastIncreasing": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "BrightnessIncreasing": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
    "SharpnessIncreasing": lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
}


def _affine(name: str, value: float, width: int, height: int) -> tuple[float, ...]:
    """PIL's inverse affine coefficients (output -> input) of timm's shear/translate ops."""
    if name == "ShearX":
        return (1, value, 0, 0, 1, 0)
    if name == "ShearY":
        return (1, 0, 0, value, 1, 0)
    if name == "TranslateXRel":
        return (1, 0, value * width, 0, 1, 0)
    return (1, 0, 0, 0, 1, value * height)  # TranslateYRel


def apply_op(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    args: tuple,
    *,
    interpolation: str = "bicubic",
    fill: tuple[int, int, int] = IMAGENET_FILL,
) -> tuple[np.ndarray, np.ndarray]:
    """One op with its argument(s): geometric ops map image AND mask (mask: nearest, fill 0),
    photometric ones return the mask object itself."""
    img = Image.fromarray(image)
    if name not in GEOMETRIC_OPS:
        return np.asarray(_PHOTOMETRIC[name](img, *args)), mask
    resample = _RESAMPLE[interpolation]
    mask_img = Image.fromarray(mask.astype(np.uint8, copy=False))
    if name == "Rotate":
        img = img.rotate(args[0], resample=resample, fillcolor=fill)
        mask_img = mask_img.rotate(args[0], resample=Image.Resampling.NEAREST, fillcolor=0)
    else:
        coeffs = _affine(name, args[0], *img.size)
        img = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)
        mask_img = mask_img.transform(
            img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST, fillcolor=0
        )
    return np.asarray(img), np.asarray(mask_img)


def sample(policy: Policy, rng: np.random.Generator) -> list[tuple[str, tuple] | None]:
    """The draws for one image, in timm's order: `num_layers` ops with replacement, then per op
    the apply coin (None = skipped), the noisy magnitude clipped to [0, magnitude_max], and the
    argument's sign."""

    def negate(value: float) -> float:
        return -value if rng.random() > 0.5 else value

    draws: list[tuple[str, tuple] | None] = []
    for i in rng.integers(0, len(policy.ops), size=policy.num_layers):
        name = policy.ops[int(i)]
        if policy.prob < 1.0 and rng.random() > policy.prob:
            draws.append(None)
            continue
        level = policy.magnitude
        if policy.magnitude_std == math.inf:
            level = rng.uniform(0.0, level)
        elif policy.magnitude_std > 0:
            level = rng.normal(level, policy.magnitude_std)
        level = max(0.0, min(level, policy.magnitude_max))
        draws.append((name, _level_args(name, level, negate)))
    return draws


def make(config: Any):
    """The augment op (image, mask, rng) -> (image, mask) of `config` (see the module doc)."""
    policy = parse(config)

    def op(image, mask, rng):
        for draw in sample(policy, rng):
            if draw is not None:
                name, args = draw
                image, mask = apply_op(
                    name, image, mask, args, interpolation=policy.interpolation, fill=policy.fill
                )
        return image, mask

    return op
