"""A pool of background photographs from a Places-style folder, grouped into habitats.

    <root>/<category>/*.jpg                     e.g. <root>/bamboo_forest, <root>/forest/broadleaf
    <root>/<first letter>/<category>/*.jpg      the Places365 `data_large` layout (b/bamboo_forest)

Each habitat is a list of categories; its pool is the images of all of them, sorted by path, so
the pool (and everything drawn from it with a seeded generator) is the same on every machine.
Usable by any foreground dataset: Waterbirds draws its backgrounds here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
