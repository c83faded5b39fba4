"""Reading, checking and encoding the image files of the real datasets (shared by the readers).

Every error names the file at fault: a missing file or folder raises FileNotFoundError with its
path, an image that does not decode raises `CorruptImageError` (a ValueError) with its path, a
mask whose size differs from its image names both files and both shapes.

`skip_corrupt` (a key of every reader's config): instead of failing at the first `source[i]` of a
corrupt file, the reader decodes every file ONCE when it is built (threads; PIL releases the GIL)
and leaves the corrupt ones out. Nothing is dropped silently: the paths are kept in
`source.skipped` and their count is logged.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_CV2_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION

log = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image or mask file that exists but does not decode."""


SKIP_CORRUPT_HINT = (
    "to leave such files out, set --config.data.skip_corrupt=True (bgjax prepare: --skip_corrupt)"
)


# ----------------------------------------------------------------------------- layout checks


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist")
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {path} does not exist")
    return path


def require_files(paths: Sequence[Path], what: str) -> None:
    """One stat per file; names the first missing one and how many are missing."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(paths)} files do not exist, e.g. {missing[0]}"
        )


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted; other files are counted and logged."""
    images, others = [], []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        path = Path(entry.path)
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    if others:
        log.warning("%s: ignored %d non-image files, e.g. %s", folder, len(others), others[0].name)
    return sorted(images)


def read_lines(path: Path, fields: int) -> list[list[str]]:
    """Whitespace-separated records with at least `fields` fields (the CUB .txt files)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=fields - 1)
            if len(parts) < fields:
                raise ValueError(f"{path}:{number}: expected {fields} fields, got {line.strip()!r}")
            rows.append(parts)
    return rows


# ----------------------------------------------------------------------------- decoding


def _decode(
    source: str | os.PathLike | io.BytesIO, mode: str, what: str, min_side: int | None = None
) -> np.ndarray:
    try:
        with Image.open(source) as im:
            if min_side is not None and im.format == "JPEG":
                # libjpeg's DCT scaling: decode at 1/2, 1/4 or 1/8 size while both sides stay
                # >= min_side. Several times less decoding and resampling for large files.
                im.draft(None, (min_side, min_side))
            # convert() copies even when the mode already matches; asarray copies once anyway.
            return np.asarray(im if im.mode == mode else im.convert(mode))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"corrupt image {what}: {e}; {SKIP_CORRUPT_HINT}") from e


def read_rgb(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3]; grey, palette and CMYK files are converted.

    `min_side`: a JPEG whose sides are >= 2 * min_side is decoded at 1/2, 1/4 or 1/8 scale (PIL's
    `draft`), keeping both sides >= min_side; other files decode at full size. Use it only when
    every crop of the image is downscaled anyway (`augment.min_source_side` gives the bound), and
    resize the mask to the returned image's shape (nearest).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    return decode_rgb(data, str(path), min_side)


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W] (the CUB segmentations are soft grey levels 0..255)."""
    return _decode(path, "L", str(path))


def decode_rgb(data: bytes, what: str, min_side: int | None = None) -> np.ndarray:
    """`read_rgb` of a file's bytes; `what` names it in errors.

    OpenCV decodes (same libjpeg-turbo, same pixels as PIL; ~15% faster and straight into the
    array, no Python header parsing or copy): decoding is most of the input pipeline's CPU time.
    EXIF orientation is ignored, as PIL does, so masks stay aligned. PIL handles what OpenCV
    rejects (it names the fault) and reduced decoding (its draft reads the size first).
    """
    if min_side is None:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_RGB)
        if image is not None:
            return image
    return _decode(io.BytesIO(data), "RGB", what, min_side)


def decode_grey(data: bytes, what: str) -> np.ndarray:
    return _decode(io.BytesIO(data), "L", what)


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11's parser can fail with
# "AST constructor recursion depth mismatch" when threads (Grain's prefetch) parse at once.
_NPY_LOAD = threading.Lock()


def read_npy_mask(path: str | os.PathLike) -> np.ndarray:
    """A 2-D .npy mask as uint8 {0, 1} (> 0.5 is foreground). Never unpickles."""
    try:
        with _NPY_LOAD:
            array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise CorruptImageError(f"corrupt mask {path}: {e}; {SKIP_CORRUPT_HINT}") from e
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask {path} must be 2-D [H, W], got shape {array.shape}")
    return (array > 0.5).astype(np.uint8)


def check_same_size(mask: np.ndarray, image: np.ndarray, mask_what: str, image_what: str) -> None:
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"mask {mask_what} has shape {mask.shape[:2]} but image {image_what} has "
            f"{image.shape[:2]} (H, W)"
        )


def find_corrupt(paths: Sequence[Path], num_threads: int = 8) -> list[Path]:
    """The files among `paths` that do not fully decode (each is decoded once)."""

    def bad(path: Path) -> bool:
        try:
            _decode(path, "RGB", str(path))
        except CorruptImageError:
            return True
        return False

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        flags = list(pool.map(bad, paths))
    return [p for p, is_bad in zip(paths, flags) if is_bad]


def drop_corrupt(
    examples: Sequence[Path | Sequence[Path]], what: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """For `skip_corrupt=True`: (indices of the good examples, the corrupt files), count logged.

    An example is one file or several (image and mask); it is dropped if any of them is corrupt.
    """
    groups = [(e,) if isinstance(e, (str, os.PathLike)) else tuple(e) for e in examples]
    corrupt = find_corrupt([p for group in groups for p in group])
    bad = set(corrupt)
    keep = np.array([i for i, g in enumerate(groups) if not bad.intersection(g)], np.int64)
    skipped = tuple(map(str, corrupt))
    if skipped:
        log.warning(
            "%s: skipped %d examples with corrupt files (skip_corrupt=True), e.g. %s",
            what,
            len(groups) - len(keep),
            skipped[0],
        )
    return keep, skipped


# ----------------------------------------------------------------------------- boxes and encoding


def clip_box(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """A float (x0, y0, x1, y1) box as int32, end-exclusive, inside the image and non-empty."""
    x0, y0, x1, y1 = box
    x0 = min(max(int(np.floor(x0)), 0), width - 1)
    y0 = min(max(int(np.floor(y0)), 0), height - 1)
    x1 = min(max(int(np.ceil(x1)), x0 + 1), width)
    y1 = min(max(int(np.ceil(y1)), y0 + 1), height)
    return np.array([x0, y0, x1, y1], np.int32)


def encode(array: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    """PNG (lossless; masks) or JPEG bytes of a uint8 [H, W] or [H, W, 3] array."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def file_bytes_if_rgb(path: Path) -> bytes | None:
    """The file's bytes when it is an RGB JPEG or PNG (storable as is), else None (re-encode)."""
    with Image.open(path) as im:
        if im.format in ("JPEG", "PNG") and im.mode == "RGB":
            return path.read_bytes()
    return None
