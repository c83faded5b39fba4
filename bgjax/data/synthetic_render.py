"""How the synthetic dataset (`synthetic`) draws one example: a shape over a habitat texture.

`render(label, habitat, size, rng)` draws shape `label` over texture family `habitat`; everything
else (scale, rotation, position, colours, the texture's phase and period) comes from `rng`, so the
same generator state gives the same example.

Design choices that make the benchmark mean something:
  * Classes differ ONLY in silhouette. Colour, shading, scale, rotation (within +-30 degrees:
    objects are roughly upright, as in photos) and position are drawn independently of the label.
    All nine shapes are mirror-symmetric up to rotation, so horizontal flips keep the label.
  * Habitats are texture families (stripe orientations, checker, dots, waves, ripples, blobs,
    mosaic) with random phase, period, orientation jitter and colours; like real habitats (water
    is blue, forest green) each family's hues scatter around its own palette centre.
  * The mask is the exact silhouette: pixels inside it are the object, pixels outside are
    background (no anti-aliasing), so the IN-9 variants built from it are exact.
  * Objects fit in a disc of at most `_MAX_DIAMETER` of the image side, leaving background margins
    for the IN-9 ONLY_BG_T tiling.
  * Tuned so that small models learn BOTH cues, the background first (palette + faint texture)
    and the shape later, as real classifiers do: `bgjax demo` measures it, and README.md's
    "What the demo shows" has its results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

# Label i draws SHAPES[i] and habitat j the texture family HABITATS[j]: the class and habitat
# names of the dataset, whose C classes take the first C of each.
SHAPES = ("star", "cross", "ring", "triangle", "crescent", "ell", "arrow", "heart", "eich")
HABITATS = (
    "horizontal",
    "vertical",
    "diagonal",
    "checker",
    "dots",
    "waves",
    "ripples",
    "blobs",
    "mosaic",
)

# Object geometry, in image sides: the diameter of the disc enclosing the object (its tight box is
# at most this: <= 88% of the side, as IN-9's <= 90% boxes) and the disc's smallest distance to the
# border, so every side keeps a background margin for the ONLY_BG_T tiling.
_MIN_DIAMETER, _MAX_DIAMETER = 0.6, 0.88
_MIN_MARGIN = 0.03
_MAX_ROTATION = np.deg2rad(30.0)
# Texture period in image sides (64 px: ~7-10 px), large enough for a 4x4 patchify stem to see.
_MIN_PERIOD, _MAX_PERIOD = 0.11, 0.16
_ORIENTATION_JITTER = np.deg2rad(10.0)
_BG_CONTRAST = (0.06, 0.14)  # brightness difference of the texture's two colours
_BG_SATURATION = (0.15, 0.45)
# Habitat palettes: hue centres spread so that any prefix of habitats is far apart on the colour
# wheel, and each colour's hue jittered by up to _HUE_JITTER (0.5 = hue carries no information).
_HABITAT_HUES = np.array([0, 5, 1, 6, 2, 7, 3, 8, 4]) / 9
_HUE_JITTER = 0.15

# Mean/std of the rendered pixels (RGB in [0, 1]), measured once over the first 4,096 training
# examples of the default config (seed 0, 64 px, 9 classes) with `np.mean` / `np.std` over all
# pixels: (0.386, 0.390, 0.388) / (0.153, 0.155, 0.153). Hues are balanced, so the channels agree;
# other sizes, class counts and seeds moved them by < 0.02. Re-measure if the style changes.
MEAN = (0.388, 0.388, 0.388)
STD = (0.154, 0.154, 0.154)


# ----------------------------------------------------------------------------------------------
# Shapes: boolean silhouettes on object coordinates (u, v) in the unit disc (v points down).
# Each fits inside the unit disc, so any rotation keeps it inside the object's enclosing disc.
# All nine are mirror-symmetric up to rotation, so horizontal flips preserve the label.


def _star(u, v):
    # Five-pointed star polygon: fold the angle into one point's half-sector and test the edge
    # between the outer vertex (1, 0) and the inner vertex at 36 degrees.
    half = np.pi / 5
    r = np.hypot(u, v)
    phi = np.abs((np.arctan2(v, u) + half) % (2 * half) - half)
    px, py = r * np.cos(phi), r * np.sin(phi)
    ix, iy = 0.5 * np.cos(half), 0.5 * np.sin(half)
    return (ix - 0.96) * py - iy * (px - 0.96) >= 0


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au < 0.3) & (av < 0.9)) | ((av < 0.3) & (au < 0.9))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 < 0.95**2) & (r2 > 0.5**2)


def _triangle(u, v):
    # Equilateral, circumradius 0.95: three half-planes at the inradius.
    inside = v < 0.475
    for angle in (np.pi / 6, 5 * np.pi / 6):
        inside &= -(u * np.cos(angle) + v * np.sin(angle)) < 0.475
    return inside


def _crescent(u, v):
    return (u * u + v * v < 0.95**2) & ((u - 0.45) ** 2 + v * v > 0.72**2)


def _ell(u, v):
    # An L whose bounding square is centred; arms 0.45 thick.
    box = (np.abs(u) < 0.66) & (np.abs(v) < 0.66)
    return box & ((u < -0.2) | (v > 0.2))


def _arrow(u, v):
    shaft = (u > -0.9) & (u < 0.15) & (np.abs(v) < 0.2)
    head = (u >= 0.15) & (np.abs(v) < 0.75 * (0.9 - u))
    return shaft | head


def _heart(u, v):
    # The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled into the disc.
    x, y = u / 0.75, -v / 0.75 + 0.15
    q = x * x + y * y - 1
    return q * q * q - x * x * y * y * y <= 0


def _eich(u, v):
    au, av = np.abs(u), np.abs(v)
    posts = (au > 0.3) & (au < 0.65) & (av < 0.65)
    rung = (au < 0.65) & (av < 0.15)
    return posts | rung


_SHAPE_FNS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _star,
    _cross,
    _ring,
    _triangle,
    _crescent,
    _ell,
    _arrow,
    _heart,
    _eich,
)


# ----------------------------------------------------------------------------------------------
# Habitats: texture maps t in [0, 1] over image coordinates (x, y) in image sides; the background
# colour is c0 + t * (c1 - c0). Each family draws its own phase / frequency / orientation jitter.


def _sharpen(field):
    # Flat two-tone regions where |field| > 1/4, short linear ramps between: crisp, never aliased.
    return np.clip(0.5 + 2.0 * field, 0.0, 1.0)


def _square_wave(phase):
    return _sharpen(np.sin(phase))


def _rotated(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _stripes(base_angle):
    def texture(x, y, rng, period):
        a, _ = _rotated(x, y, base_angle + rng.uniform(-1, 1) * _ORIENTATION_JITTER)
        return _square_wave(2 * np.pi * a / period + rng.uniform(0, 2 * np.pi))

    return texture


def _checker(x, y, rng, period):
    a, b = _rotated(x, y, rng.uniform(-1, 1) * _ORIENTATION_JITTER)
    sa = np.sin(2 * np.pi * a / period + rng.uniform(0, 2 * np.pi))
    sb = np.sin(2 * np.pi * b / period + rng.uniform(0, 2 * np.pi))
    return _sharpen(4 * sa * sb)


def _dots(x, y, rng, period):
    a, b = _rotated(x, y, rng.uniform(-1, 1) * _ORIENTATION_JITTER)
    da = (a / period + rng.uniform()) % 1.0 - 0.5
    db = (b / period + rng.uniform()) % 1.0 - 0.5
    return (da * da + db * db < 0.3**2).astype(np.float32)


def _waves(x, y, rng, period):
    wobble = rng.uniform(1.5, 2.5) * np.sin(
        2 * np.pi * x / rng.uniform(0.3, 0.45) + rng.uniform(0, 7)
    )
    return _square_wave(2 * np.pi * y / period + wobble + rng.uniform(0, 2 * np.pi))


def _ripples(x, y, rng, period):
    cx, cy = rng.uniform(-0.25, 1.25, size=2)
    return _square_wave(2 * np.pi * np.hypot(x - cx, y - cy) / period + rng.uniform(0, 2 * np.pi))


def _blobs(x, y, rng, period):
    # Isotropic blotches: the sign of a sum of plane waves with random directions, 2.5 periods.
    field = 0.0
    for angle in rng.uniform(0, 2 * np.pi, size=4):
        a, _ = _rotated(x, y, angle)
        field = field + np.sin(2 * np.pi * a / (2.5 * period) + rng.uniform(0, 2 * np.pi))
    return _sharpen(field)


def _mosaic(x, y, rng, period):
    # Random two-tone tiles of half a period: i.i.d. cells, no orientation or periodic pattern.
    cell = period / 2
    n = int(np.ceil(1 / cell)) + 1
    tiles = (rng.random((n, n)) < 0.5).astype(np.float32)
    return tiles[(y / cell).astype(np.int32), (x / cell).astype(np.int32)]


_HABITAT_FNS = (
    _stripes(0.5 * np.pi),  # horizontal: the wave runs along y
    _stripes(0.0),
    _stripes(0.25 * np.pi),
    _checker,
    _dots,
    _waves,
    _ripples,
    _blobs,
    _mosaic,
)


# ----------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a size x size image, in image sides; cached, read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _hsv_to_rgb(h, s, v):
    """HSV in [0, 1] -> RGB in [0, 1]; arrays of any (equal) shape."""
    k = (np.array([5.0, 3.0, 1.0]) + np.asarray(h)[..., None] * 6) % 6
    ramp = np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.asarray(v)[..., None] * (1 - np.asarray(s)[..., None] * ramp)


def _draw_object(label, x, y, rng):
    """Shape `label` scaled to a random diameter, rotated, placed anywhere its enclosing disc fits
    with a margin; one saturated colour with a random linear shading. -> (mask, rgb)."""
    radius = 0.5 * rng.uniform(_MIN_DIAMETER, _MAX_DIAMETER)
    cx, cy = rng.uniform(radius + _MIN_MARGIN, 1 - radius - _MIN_MARGIN, size=2)
    u, v = _rotated(x - cx, y - cy, rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    u, v = u / radius, v / radius
    mask = _SHAPE_FNS[label](u, v)
    color = _hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0))
    su, sv = _rotated(0.3, 0.0, rng.uniform(0, 2 * np.pi))
    return mask, (0.8 + su * u + sv * v)[..., None] * color


def _draw_background(habitat, x, y, rng):
    """A texture of family `habitat` in two muted colours from the family's palette whose
    brightness differs by `_BG_CONTRAST`: faint enough that the shape can compete. -> rgb."""
    t = _HABITAT_FNS[habitat](x, y, rng, rng.uniform(_MIN_PERIOD, _MAX_PERIOD))
    # Which colour is the brighter one is random: no family is brighter on average.
    contrast = rng.uniform(*_BG_CONTRAST) * rng.choice((-1.0, 1.0))
    values = rng.uniform(0.3, 0.6) + np.array([0.0, contrast])
    hues = _HABITAT_HUES[habitat] + rng.uniform(-_HUE_JITTER, _HUE_JITTER, size=2)
    colors = _hsv_to_rgb(hues % 1.0, rng.uniform(*_BG_SATURATION, size=2), values)
    return colors[0] + t[..., None] * (colors[1] - colors[0])


def render(label: int, habitat: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example: shape `label` over texture `habitat`; every other attribute comes from `rng`.

    The object's draws come first and their number does not depend on the label, so the same
    generator state with another habitat changes only the background, and with another label only
    the object."""
    x, y = _pixel_grid(size)
    mask, foreground = _draw_object(label, x, y, rng)
    background = _draw_background(habitat, x, y, rng)
    image = np.where(mask[..., None], foreground, background)
    image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int32)
    return {
        "image": image,
        "mask": mask.astype(np.uint8),
        "bbox": bbox,
        "label": np.int32(label),
        "habitat": np.int32(habitat),
    }
