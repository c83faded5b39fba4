"""Image decoding: OpenCV's fast path gives PIL's pixels, reduced JPEG decoding, named errors."""

import io

import numpy as np
import pytest
from PIL import Image

from bgjax.data import imagefiles


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pil_rgb(data: bytes) -> np.ndarray:
    """The reference: what the readers decoded with before (PIL, converted to RGB)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    noise = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
    return Image.fromarray(noise).resize((96, 72), Image.BICUBIC)


def test_decode_gives_pil_pixels_for_every_kind_of_file(picture):
    rotated = picture.getexif()
    rotated[0x0112] = 6  # EXIF orientation "rotate 90": ignored, as PIL does, so masks align
    files = {
        "rgb jpeg": _encode(picture, "JPEG", quality=90),
        "grey jpeg": _encode(picture.convert("L"), "JPEG"),
        "exif-rotated jpeg": _encode(picture, "JPEG", exif=rotated.tobytes()),
        "rgb png": _encode(picture, "PNG"),
        "rgba png": _encode(picture.convert("RGBA"), "PNG"),
        "palette png": _encode(picture.convert("P"), "PNG"),
        "grey png": _encode(picture.convert("L"), "PNG"),
    }
    for what, data in files.items():
        image = imagefiles.decode_rgb(data, what)
        assert image.dtype == np.uint8 and image.shape == (72, 96, 3), what
        np.testing.assert_array_equal(image, _pil_rgb(data), err_msg=what)


def test_read_rgb_reads_files_and_names_missing_or_corrupt_ones(picture, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_encode(picture, "JPEG"))
    np.testing.assert_array_equal(imagefiles.read_rgb(path), _pil_rgb(path.read_bytes()))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        imagefiles.read_rgb(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(imagefiles.CorruptImageError, match="broken.jpg"):
        imagefiles.read_rgb(broken)
    with pytest.raises(imagefiles.CorruptImageError, match="record 7"):
        imagefiles.decode_rgb(b"not an image", "record 7")


def test_min_side_decodes_large_jpegs_reduced(picture):
    large = picture.resize((400, 300), Image.BICUBIC)
    jpeg = _encode(large, "JPEG", quality=95)
    full = imagefiles.decode_rgb(jpeg, "large")
    assert full.shape == (300, 400, 3)
    # 300 // 64 = 4: libjpeg decodes at 1/4 (DCT scaling), both sides still >= 64.
    reduced = imagefiles.decode_rgb(jpeg, "large", min_side=64)
    assert reduced.shape == (75, 100, 3)
    # The same picture, up to the kernel: close to an area-averaged reduction of the full decode.
    expected = full.reshape(75, 4, 100, 4, 3).mean(axis=(1, 3))
    assert np.abs(reduced - expected).mean() < 3
    # Not 2x larger than min_side, or not a JPEG: decoded at full size.
    assert imagefiles.decode_rgb(jpeg, "large", min_side=200).shape == (300, 400, 3)
    png = _encode(large, "PNG")
    assert imagefiles.decode_rgb(png, "large png", min_side=64).shape == (300, 400, 3)
