"""`bgjax show-variants`: a picture of the eight ImageNet-9 variants of a few examples.

    bgjax show-variants --dataset synthetic --out grid.png [--n 6] [--seed 0] [--image_size 64]

One row per example (labelled with its class, and its habitat when the dataset knows it), one
column per variant. Rows cycle through the
classes so that the picture shows as many as it can; mixed partners come from the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from absl import app, logging
from ml_collections import ConfigDict

from bgjax import clflags, data, plots, variants

_DATASET = clflags.string("dataset", "synthetic", "dataset name (see bgjax.data)")
_SPLIT = clflags.string("split", "train", "dataset split to draw the examples from")
_OUT = clflags.string("out", None, "output image path (.png, .pdf, .svg)")
_N = clflags.integer("n", 6, "number of examples (rows)")
_SEED = clflags.integer("seed", 0, "seed for the examples and the mixed partners")
_IMAGE_SIZE = clflags.integer("image_size", 64, "image size of the dataset")


def pick_examples(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """`n` example indices, cycling through the classes present in a random order."""
    classes = rng.permutation(np.unique(labels))
    return [int(rng.choice(np.flatnonzero(labels == classes[i % classes.size]))) for i in range(n)]


def variant_rows(
    source: data.Source, n: int, seed: int
) -> list[tuple[str, Mapping[str, np.ndarray]]]:
    """`(row label, {variant: image})` for `n` examples of `source`, for plots.variant_grid."""
    info = source.info
    rng = np.random.default_rng(seed)
    sampler = variants.PartnerSampler(info.labels, info.num_classes)
    rows = []
    for index in pick_examples(info.labels, n, rng):
        example = source[index]
        images = {}
        for name in variants.VARIANTS:
            donor = {}
            if name in variants.MIXED:
                partner = source[sampler.sample(name, index, rng)]
                donor = dict(
                    bg_image=partner["image"], bg_mask=partner["mask"], bg_bbox=partner["bbox"]
                )
            images[name] = variants.composite(
                name, example["image"], example["mask"], bbox=example["bbox"], **donor
            )
        label = f"{info.class_names[int(example['label'])]} #{index}"
        habitat = int(example.get("habitat", -1))
        if info.habitat_names is not None and habitat >= 0:
            label += f"\non {info.habitat_names[habitat]}"
        rows.append((label, images))
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _OUT.value:
        raise app.UsageError("--out (the output picture path) is required")
    config = ConfigDict({"name": _DATASET.value or "synthetic", "image_size": _IMAGE_SIZE.value})
    source = data.get_source(config, _SPLIT.value)
    path = plots.variant_grid(variant_rows(source, _N.value, _SEED.value), _OUT.value)
    logging.info("wrote %s", path)
    print(path)
