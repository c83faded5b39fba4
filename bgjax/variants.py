"""The eight ImageNet-9 background variants ("Noise or Signal", Xiao et al. 2021) and soft-alpha
compositing (Waterbirds). Pure NumPy (PIL only to resize a background), no JAX, no I/O.

Called once per example inside the data pipeline, so everything is vectorised on uint8: boolean
selects instead of float arithmetic, one output allocation per call.

    original    the image
    only_bg_b   the bounding box filled with black
    only_bg_t   the bounding box filled with background tiled from its widest margin strip
    no_fg       the foreground silhouette blacked out            image * (1 - mask)
    only_fg     the foreground alone on black                    image * mask
    mixed_same  the foreground pasted on ONLY_BG_T of an image of the same class
    mixed_rand  ... of an image of a uniformly random class
    mixed_next  ... of an image of class (y + 1) mod C

Boxes are (x0, y0, x1, y1), end-exclusive pixel coordinates. Mixed images keep the FOREGROUND's
label: the caller (the data pipeline) picks the donor with `PartnerSampler` / `partner_index`,
passes it as `bg_*`, and leaves the example's label as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

VARIANTS = (
    "original",
    "only_bg_b",
    "only_bg_t",
    "no_fg",
    "only_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
MIXED = ("mixed_same", "mixed_rand", "mixed_next")
# Variants whose foreground was removed: their foreground mask is empty (see composite_mask).
NO_FOREGROUND = ("only_bg_b", "only_bg_t", "no_fg")

BBox = Sequence[int] | np.ndarray


# ----------------------------------------------------------------------------- input checks


def _check_image(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{what} must be a uint8 NumPy array [H, W, 3], got dtype {dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must have shape [H, W, 3], got {image.shape}")


def _check_mask(mask: np.ndarray, image_shape: tuple[int, ...], what: str = "mask") -> np.ndarray:
    """Returns the mask as bool [H, W]; accepts bool or numbers that are exactly 0 or 1."""
    mask = np.asarray(mask)
    if mask.shape != image_shape[:2]:
        raise ValueError(
            f"{what} shape {mask.shape} does not match the image's H x W {image_shape[:2]}"
        )
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:  # the common case: one max() instead of two comparisons
        bad = mask.max() > 1
    else:
        bad = bool(np.any((mask != 0) & (mask != 1)))
    if bad:
        values = np.unique(mask)[:8]
        raise ValueError(f"{what} values must be in {{0, 1}} (or bool), got values {values}")
    return mask.astype(bool)


def _check_bbox(bbox: BBox, height: int, width: int) -> tuple[int, int, int, int]:
    if len(bbox) != 4:
        raise ValueError(f"bbox must be (x0, y0, x1, y1), got {bbox!r}")
    x0, y0, x1, y1 = (int(v) for v in bbox)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"bbox (x0, y0, x1, y1)={(x0, y0, x1, y1)} is empty or outside the image "
            f"(H={height}, W={width}); need 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H"
        )
    return x0, y0, x1, y1


def bbox_from_mask(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The tight box (x0, y0, x1, y1), end-exclusive, around the mask's nonzero pixels."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise ValueError(f"empty mask (no foreground pixel) of shape {mask.shape}")
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------- background variants


def only_bg_b(image: np.ndarray, bbox: BBox) -> np.ndarray:
    """The image with the bounding box filled with black."""
    _check_image(image)
    x0, y0, x1, y1 = _check_bbox(bbox, *image.shape[:2])
    out = image.copy()
    out[y0:y1, x0:x1] = 0
    return out


def _widest_margin_strip(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The strip choice of the backgrounds_challenge script, ties resolved exactly as there
    (docs/reference.md#only-bg-t).

    A full-height side strip only if it has strictly more pixels than the widest full-width
    top/bottom strip; left only if strictly wider than right; top only if strictly taller.
    """
    height, width = image.shape[:2]
    left, right, top, bottom = x0, width - x1, y0, height - y1
    if max(left, right) * height > max(top, bottom) * width:
        return image[:, :x0] if left > right else image[:, x1:]
    if max(top, bottom) == 0:
        raise ValueError(
            f"ONLY_BG_T needs background outside the box, but bbox {(x0, y0, x1, y1)} covers "
            f"the whole {height}x{width} image"
        )
    return image[:y0] if top > bottom else image[y1:]


def only_bg_t(image: np.ndarray, bbox: BBox) -> np.ndarray:
    """The image with the box filled by tiling its widest margin strip, repeated from (0, 0).

    Canvas pixel (y, x) of the tiling is strip[y % h, x % w]; only the box takes canvas pixels,
    everything outside the box is the image unchanged.
    """
    _check_image(image)
    x0, y0, x1, y1 = _check_bbox(bbox, *image.shape[:2])
    strip = _widest_margin_strip(image, x0, y0, x1, y1)
    height, width = strip.shape[:2]
    # Only as many copies as reach the box's far corner; one axis is always a single copy.
    canvas = np.tile(strip, (-(-y1 // height), -(-x1 // width), 1))
    out = image.copy()
    out[y0:y1, x0:x1] = canvas[y0:y1, x0:x1]
    return out


def _fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop `background` to the aspect ratio width/height, then bilinear-resize to it."""
    bh, bw = background.shape[:2]
    if (bh, bw) == (height, width):
        return background
    if bw * height > bh * width:  # too wide: keep the full height
        crop_w = max(1, round(bh * width / height))
        left = (bw - crop_w) // 2
        background = background[:, left : left + crop_w]
    else:  # too tall (or already the right aspect): keep the full width
        crop_h = max(1, round(bw * height / width))
        top = (bh - crop_h) // 2
        background = background[top : top + crop_h]
    resized = Image.fromarray(np.ascontiguousarray(background)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.array(resized)  # a writable copy (np.asarray of a PIL image is read-only)


def _donor_background(
    image_shape: tuple[int, ...],
    bg_image: np.ndarray,
    bg_mask: np.ndarray | None,
    bg_bbox: BBox | None,
) -> np.ndarray:
    """ONLY_BG_T of the donor, fitted to the foreground image's size when the sizes differ."""
    _check_image(bg_image, "bg_image")
    if bg_bbox is None:
        bg_bbox = bbox_from_mask(_check_mask(bg_mask, bg_image.shape, "bg_mask"))
    background = only_bg_t(bg_image, bg_bbox)
    return _fit_background(background, *image_shape[:2])


def _paste(dst: np.ndarray, src: np.ndarray | int, where: np.ndarray) -> np.ndarray:
    """dst[where] = src[where], in place, returns dst. `where` is bool [H, W].

    One channel at a time: broadcasting an [H, W, 1] condition over a trailing axis of 3 runs
    NumPy's inner loop 3 elements at a time, several times slower at 224 px.
    """
    for c in range(dst.shape[-1]):
        np.copyto(dst[..., c], src if np.isscalar(src) else src[..., c], where=where)
    return dst


def composite(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    bbox: BBox | None = None,
    bg_image: np.ndarray | None = None,
    bg_mask: np.ndarray | None = None,
    bg_bbox: BBox | None = None,
) -> np.ndarray:
    """The variant `name` of one example, a new uint8 [H, W, 3] array.

    Args:
      name: one of VARIANTS.
      image: uint8 [H, W, 3].
      mask: [H, W] foreground, bool or numbers in {0, 1}; it must mark at least one pixel.
      bbox: the object's box (x0, y0, x1, y1), end-exclusive; the mask's bounding box when None.
      bg_image, bg_mask, bg_bbox: the background donor for mixed_* (see PartnerSampler). The
        donor's box is bg_bbox, or bg_mask's bounding box when bg_bbox is None. A donor of
        another size has its ONLY_BG_T centre-cropped and resized to the image.

    Mixed variants paste the foreground WITH THE MASK, so black foreground pixels survive (the
    reference script pasted by replacing exactly-black pixels). The result keeps the
    foreground's label; the caller keeps the label unchanged.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    _check_image(image)
    fg = _check_mask(mask, image.shape)
    if name == "original":
        return image.copy()
    if not fg.any():
        raise ValueError(f"empty mask (no foreground pixel) of shape {fg.shape}")

    if name in ("only_bg_b", "only_bg_t"):
        box = bbox_from_mask(fg) if bbox is None else bbox
        return (only_bg_b if name == "only_bg_b" else only_bg_t)(image, box)
    if name == "no_fg":
        return _paste(image.copy(), 0, fg)
    if name == "only_fg":
        return _paste(np.zeros_like(image), image, fg)
    if bg_image is None or (bg_mask is None and bg_bbox is None):
        raise ValueError(
            f"variant {name!r} needs a background donor: pass bg_image and bg_mask (or bg_bbox)"
        )
    background = _donor_background(image.shape, bg_image, bg_mask, bg_bbox)
    return _paste(background, image, fg)


def composite_mask(name: str, mask: np.ndarray) -> np.ndarray:
    """The foreground mask of variant `name` of an example with foreground `mask`: the same
    object in every variant that keeps it, EMPTY in those that removed it. (Keeping the removed
    object's mask would hand a masking model the object's silhouette: an early-masked model
    then classifies ONLY_BG_T from the shape of the hole.)"""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return np.zeros_like(mask) if name in NO_FOREGROUND else mask


# ----------------------------------------------------------------------------- mixed partners


class PartnerSampler:
    """Picks background donors for the mixed variants from per-class index lists built once.

    mixed_same: a random example of the same class.
    mixed_rand: a random example of a uniformly random class (among classes with examples).
    mixed_next: a random example of class (y + 1) mod C; if that class has no examples here,
      the next class that has some, cyclically.

    The donor is never the foreground example itself unless it is the only example of the
    chosen class (the reference allowed self-pairing for mixed_same, which turns it into a plain
    ONLY_BG_T-filled original; excluding it keeps MIXED_SAME a real background swap).
    """

    def __init__(self, labels: np.ndarray, num_classes: int | None = None):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
        self.num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.max() >= self.num_classes:
            raise ValueError(f"label {labels.max()} >= num_classes {self.num_classes}")
        self.labels = labels
        # Example indices grouped by class: members of class c are order[starts[c]:starts[c+1]];
        # example i sits at position rank[i] within its class.
        self._order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._rank = np.empty(labels.size, np.int64)
        self._rank[self._order] = np.arange(labels.size) - self._starts[labels[self._order]]
        self._nonempty = np.flatnonzero(counts)
        # class (c + 1) mod C, or the first class after it that has examples, cyclically
        classes = np.arange(self.num_classes)
        later = (classes[:, None] + 1 + classes) % self.num_classes  # row c: c+1, c+2, ...
        self._next_class = later[classes, np.argmax(counts[later] > 0, axis=1)]

    def __len__(self) -> int:
        return self.labels.size

    def _draw(self, cls: int, index: int, rng: np.random.Generator) -> int:
        """A random member of class `cls`, other than `index` when possible."""
        start, stop = int(self._starts[cls]), int(self._starts[cls + 1])
        n = stop - start
        if int(self.labels[index]) != cls:
            return int(self._order[start + rng.integers(n)])
        if n == 1:
            return index
        k = int(rng.integers(n - 1))  # skip over the example itself
        return int(self._order[start + k + (k >= self._rank[index])])

    def sample(self, name: str, index: int, rng: np.random.Generator) -> int:
        """The donor index for example `index` under mixed variant `name`."""
        if not 0 <= index < self.labels.size:
            raise ValueError(f"index {index} out of range for {self.labels.size} examples")
        label = int(self.labels[index])
        if name == "mixed_same":
            cls = label
        elif name == "mixed_rand":
            cls = int(self._nonempty[rng.integers(self._nonempty.size)])
        elif name == "mixed_next":
            cls = int(self._next_class[label])
        else:
            raise ValueError(f"{name!r} is not a mixed variant; mixed variants: {MIXED}")
        return self._draw(cls, index, rng)


_last_sampler: tuple[object, int | None, PartnerSampler] | None = None


def partner_index(
    name: str,
    labels: np.ndarray,
    index: int,
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> int:
    """Convenience form of `PartnerSampler(labels, num_classes).sample(name, index, rng)`.

    The sampler of the last `labels` object seen is kept, so repeated calls with the same array
    (e.g. `source.info.labels`) build the class lists once. Do not modify that array in place
    between calls; hot loops may hold a PartnerSampler themselves.
    """
    global _last_sampler
    cached = _last_sampler
    if cached is None or cached[0] is not labels or cached[1] != num_classes:
        cached = (labels, num_classes, PartnerSampler(labels, num_classes))
        _last_sampler = cached  # one tuple assignment: safe across threads
    return cached[2].sample(name, index, rng)


# ----------------------------------------------------------------------------- soft alpha


def alpha_composite(image: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Waterbirds compositing: image * alpha + background * (1 - alpha), rounded to uint8.

    `alpha` is a soft [H, W] foreground in [0, 1] (e.g. a CUB segmentation / 255) or bool;
    `background` (any size) is centre-cropped to the image's aspect ratio and resized (bilinear).
    """
    _check_image(image)
    _check_image(background, "background")
    alpha = np.asarray(alpha)
    if alpha.shape != image.shape[:2]:
        raise ValueError(
            f"alpha shape {alpha.shape} does not match the image's H x W {image.shape[:2]}"
        )
    if alpha.dtype != np.bool_ and not np.issubdtype(alpha.dtype, np.floating):
        raise ValueError(
            f"alpha must be float in [0, 1] (e.g. segmentation / 255) or bool, got {alpha.dtype}"
        )
    alpha = alpha.astype(np.float32, copy=False)
    if alpha.min() < 0 or alpha.max() > 1:
        raise ValueError(f"alpha must lie in [0, 1], got range [{alpha.min()}, {alpha.max()}]")
    bg = _fit_background(background, *image.shape[:2]).astype(np.float32)
    out = image.astype(np.float32)  # out = bg + (image - bg) * alpha, in place
    out -= bg
    for c in range(3):  # per channel, for the same reason as in _paste
        out[..., c] *= alpha
    out += bg
    return np.rint(out, out=out).astype(np.uint8)


def parse(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'all' / None -> every variant; 'a,b' or [a, b] -> those, checked against VARIANTS."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or ["all"])
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return VARIANTS
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}; valid: all, {', '.join(VARIANTS)}"
        )
    return tuple(dict.fromkeys(names))


def drawn_from(variant: str | Mapping[str, float]) -> tuple[str, ...]:
    """config.train_variant (a name or {name: weight}) -> the variants it draws from."""
    if isinstance(variant, str):
        return (variant,)
    return tuple(name for name, weight in variant.items() if weight > 0)
