"""Generated Waterbirds images are made as the group-DRO generator made the release: the
background fit (upscale when smaller, int() centre crop with equal offsets, Lanczos), the
rounding of the blend, PIL's default JPEG. Each expectation below is PIL operations with the
boxes and sizes worked out by hand for that case, in the generator's order."""

import io

import numpy as np
import pytest
from fake_trees import write_places
from PIL import Image

from bgjax.data import places, waterbirds

LANCZOS = Image.Resampling.LANCZOS
BIRD_HW = (30, 40)  # height, width: aspect 4:3


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _pil_steps(background: np.ndarray, *steps) -> np.ndarray:
    photo = Image.fromarray(background)
    for op, arg in steps:
        photo = photo.resize(arg, LANCZOS) if op == "resize" else photo.crop(arg)
    return np.asarray(photo)


@pytest.mark.parametrize(
    "background_hw, steps",
    [
        # Wide: keep int(4/3 * 50) = 66 columns, offset (100 - 66) // 2 = 17 from both ends.
        ((50, 100), [("crop", (17, 0, 83, 50)), ("resize", (40, 30))]),
        # Odd remainder: (101 - 66) // 2 = 17 off both ends keeps 67 columns, not 66.
        ((50, 101), [("crop", (17, 0, 84, 50)), ("resize", (40, 30))]),
        # Tall: int(60 / (4/3)) = 45 rows, offset (90 - 45) // 2 = 22 keeps 46.
        ((90, 60), [("crop", (0, 22, 60, 68)), ("resize", (40, 30))]),
        # Smaller than the bird: upscale to its width (40 x int(2 * 25) = 50), crop, resize.
        ((25, 20), [("resize", (40, 50)), ("crop", (0, 10, 40, 40)), ("resize", (40, 30))]),
        # Matching the width leaves it too short (int(40 / 60 * 10) = 6 < 30): match the height
        # (int(3 * 60) = 180 x 30), then crop 40 columns at (180 - 40) // 2 = 70.
        ((10, 60), [("resize", (180, 30)), ("crop", (70, 0, 110, 30)), ("resize", (40, 30))]),
    ],
)
def test_background_fit_is_the_generators(background_hw, steps):
    background = _texture(*background_hw)
    fitted = places.fit_background(background, *BIRD_HW)
    assert fitted.shape == (*BIRD_HW, 3)
    np.testing.assert_array_equal(fitted, _pil_steps(background, *steps))


def test_blend_rounds_bird_and_background_separately():
    image = np.full((*BIRD_HW, 3), 101, np.uint8)
    background = np.full((*BIRD_HW, 3), 200, np.uint8)
    segmentation = np.zeros(BIRD_HW, np.uint8)
    segmentation[:10], segmentation[10:20] = 255, 128
    out = waterbirds.composite_like_release(image, segmentation, background, jpeg_quality=0)
    assert (out[:10] == 101).all() and (out[20:] == 200).all()
    # round(101 * 128/255) + round(200 * 127/255) = 51 + 100; one rounding of the sum gives 150.
    assert (out[10:20] == 151).all()
    with pytest.raises(ValueError, match=r"segmentation \(30, 41\) does not match"):
        waterbirds.composite_like_release(image, np.zeros((30, 41), np.uint8), background)


def test_jpeg_round_trip_is_pils_default_save():
    image, background = _texture(*BIRD_HW, seed=1), _texture(45, 70, seed=2)
    segmentation = np.random.default_rng(3).integers(0, 256, BIRD_HW).astype(np.uint8)
    lossless = waterbirds.composite_like_release(image, segmentation, background, jpeg_quality=0)
    buffer = io.BytesIO()
    Image.fromarray(lossless).save(buffer, format="JPEG")  # the generator's `.save(path.jpg)`
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    np.testing.assert_array_equal(
        waterbirds.composite_like_release(image, segmentation, background), expected
    )
    assert not np.array_equal(expected, lossless)


def test_places_root_may_be_the_places365_folder(tmp_path):
    write_places(tmp_path / "places365" / "data_large", per_category=2)
    for root in (tmp_path / "places365", tmp_path / "places365" / "data_large"):
        pool = places.PlacesBackgrounds(root)
        assert [len(p) for p in pool.pools] == [4, 4]
        assert all("data_large" in str(path) for path in pool.pools[0])
