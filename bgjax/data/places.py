"""A pool of background photographs from a Places-style folder, grouped into habitats.

    <root>/<category>/*.jpg                     e.g. <root>/bamboo_forest, <root>/forest/broadleaf
    <root>/<first letter>/<category>/*.jpg      the Places365 `data_large` layout (b/bamboo_forest)

`root` may also be the Places365 folder holding `data_large/` (what the group-DRO generator's
`places_dir` names). `fit_background` fits a photograph to a foreground image's size as that
generator does.

Each habitat is a list of categories; its pool is the images of all of them, sorted by path, so
the pool (and everything drawn from it with a seeded generator) is the same on every machine.
Usable by any foreground dataset: Waterbirds draws its backgrounds here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax.data import imagefiles as files

# The Waterbirds habitats (docs/reference.md#waterbirds): index 0 land, 1 water.
WATERBIRDS_HABITATS = ("land", "water")
log = logging.getLogger(__name__)
WATERBIRDS_CATEGORIES = (("bamboo_forest", "forest/broadleaf"), ("ocean", "lake/natural"))


def category_dir(root: Path, category: str) -> Path:
    for candidate in (root / category, root / category[0] / category):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"Places category {category!r}: neither {root / category} nor "
        f"{root / category[0] / category} exists"
    )


class PlacesBackgrounds:
    """`pools[h]`: the sorted image paths of habitat h (all its categories)."""

    def __init__(
        self,
        root: str | Path | None,
        categories: Sequence[Sequence[str]] = WATERBIRDS_CATEGORIES,
        habitat_names: Sequence[str] = WATERBIRDS_HABITATS,
    ):
        if not root:
            raise ValueError("the Places backgrounds folder (places_root) is not set")
        if len(categories) != len(habitat_names):
            raise ValueError(f"{len(categories)} category lists for habitats {habitat_names}")
        self.root = files.require_dir(root, "Places backgrounds (places_root)")
        if (self.root / "data_large").is_dir():  # the Places365 root, as the generator takes it
            self.root = self.root / "data_large"
        self.habitat_names = tuple(habitat_names)
        self.pools: list[list[Path]] = []
        for name, cats in zip(habitat_names, categories):
            pool = sorted(p for c in cats for p in files.list_images(category_dir(self.root, c)))
            if not pool:
                raise ValueError(f"Places habitat {name!r}: no images in categories {list(cats)}")
            self.pools.append(pool)

    def __len__(self) -> int:
        return sum(map(len, self.pools))

    def assign(self, habitats: np.ndarray, rng: np.random.Generator) -> list[Path]:
        """A background for each entry of `habitats`: every pool is shuffled once and dealt out in
        order, so backgrounds are distinct while the pool lasts (then it is dealt again)."""
        out: list[Path | None] = [None] * len(habitats)
        for h, pool in enumerate(self.pools):
            wanted = np.flatnonzero(habitats == h)
            order = rng.permutation(len(pool))
            if len(wanted) > len(pool):
                log.warning(
                    "Places habitat %r: %d backgrounds needed, %d images; each used up to %d times",
                    self.habitat_names[h],
                    len(wanted),
                    len(pool),
                    -(-len(wanted) // len(pool)),
                )
            for k, i in enumerate(wanted):
                out[i] = pool[order[k % len(pool)]]
        return out  # type: ignore[return-value]

    def read(self, path: Path) -> np.ndarray:
        return files.read_rgb(path)


def fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """`background` (uint8 [h, w, 3]) fitted to a `height` x `width` image exactly as the
    group-DRO Waterbirds generator does (`dataset_utils.crop_and_resize`, Sagawa et al.):

    1. smaller than the image in either side: resized (Lanczos) to the image's width with the
       height int()-truncated, or, if that is too short, to its height with the width truncated;
    2. centre-cropped to the image's aspect ratio: the kept side is int()-truncated and the same
       offset (remainder // 2) is cut from both ends, so an odd remainder keeps one extra pixel;
    3. resized to width x height with Lanczos (PIL's ANTIALIAS).
    The float expressions keep the generator's order, so the truncations land on the same side.
    """
    photo = Image.fromarray(np.ascontiguousarray(background))
    if photo.width < width or photo.height < height:
        size = (width, int((width / photo.width) * photo.height))
        if size[1] < height:
            size = (int((height / photo.height) * photo.width), height)
        photo = photo.resize(size, Image.Resampling.LANCZOS)
    aspect = width / height
    if photo.width / photo.height > aspect:  # too wide: keep the full height
        offset = (photo.width - int(aspect * photo.height)) // 2
        box = (offset, 0, photo.width - offset, photo.height)
    else:
        offset = (photo.height - int(photo.width / aspect)) // 2
        box = (0, offset, photo.width, photo.height - offset)
    fitted = photo.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.array(fitted)  # writable (np.asarray of a PIL image is read-only)
