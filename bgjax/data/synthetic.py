"""The built-in procedural dataset: shapes on textured habitats with a controllable spurious cue.

Every example is a random *shape* (the label) drawn over a random *texture family* (the habitat,
the background class), rendered from (seed, split, index) alone, so the dataset needs no files and
any index can be read in any order. In the training split the habitat equals the label for a
fraction `bg_correlation` of the examples (Waterbirds uses 0.95); the "balanced" evaluation splits
draw habitats uniformly and independently of the label, so worst-group accuracy exposes models that
lean on the background.

How an example is drawn, and the design choices that make the benchmark mean something (classes
differ only in silhouette, habitats are texture families, exact masks, background margins), are in
`synthetic_render`; this module holds the Grain source, its splits, their label / habitat
assignment and the config keys.

Config keys (`config.data`), with defaults:
    name="synthetic", image_size=64 (16..224), num_classes=9 (2..9; 2 mirrors Waterbirds),
    bg_correlation=0.9, seed=0, train_size=1000*C, val_size=200*C, test_size=200*C,
    test_distribution="balanced" | "iid".
Splits: "train" (correlated), "val" and "test" (following `test_distribution`), and explicit
"test_iid" / "test_balanced".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bgjax.data import DatasetInfo, synthetic_render

MAX_CLASSES = len(synthetic_render.SHAPES)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 224
TEST_DISTRIBUTIONS = ("balanced", "iid")
SPLITS = ("train", "val", "test", "test_iid", "test_balanced")
# Random streams: one per (seed, split stream, index). Distinct ids keep splits disjoint.
_SPLIT_IDS = {"train": 0, "val_iid": 1, "val_balanced": 2, "test_iid": 3, "test_balanced": 4}
_ASSIGN_STREAM = 100  # offset of the label/habitat assignment streams (never an index stream)
_DEFAULT_SIZES_PER_CLASS = {"train_size": 1000, "val_size": 200, "test_size": 200}


# ----------------------------------------------------------------------------------------------
# Label / habitat assignment (no rendering): exact, stratified proportions in a random order.


def assign_groups(
    num_examples: int, num_classes: int, correlation: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and habitats; habitat == label for round(correlation * n_c) examples of each
    class (the rest spread evenly over the other habitats), or, with correlation None, habitats
    spread evenly over all classes independently of the label."""
    # A random bijection index -> (class, rank within class) keeps every prefix a random sample.
    slot = rng.permutation(num_examples)
    labels, rank = slot % num_classes, slot // num_classes
    if correlation is None:
        habitats = (labels + rank) % num_classes
    else:
        per_class = np.bincount(labels, minlength=num_classes)
        aligned = np.round(correlation * per_class).astype(np.int64)[labels]
        offset = np.where(rank < aligned, 0, 1 + (rank - aligned) % (num_classes - 1))
        habitats = (labels + offset) % num_classes
    return labels.astype(np.int32), habitats.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The source.


# Splits up to this many bytes of pixels keep every rendered example in memory (9,000 examples
# of 64 px are 147 MB): rendering costs more than the whole small-model train step per image,
# and training re-reads each example every epoch (mixed_* variants read a donor too).
CACHE_BYTES = 512 * 2**20


class SyntheticSource:
    """Grain random-access source: `source[i]` renders example i (once, if the split fits
    CACHE_BYTES: rendering is deterministic, so the cache changes no value); `.info` needs no
    rendering."""

    def __init__(self, info: DatasetInfo, *, split_id: int, seed: int):
        self.info, self._split_id, self._seed = info, split_id, seed
        n, s = len(info.labels), info.image_size
        self._cached = n * s * s * 4 <= CACHE_BYTES
        if self._cached:  # np.empty: pages are only touched when an example is stored
            self._images = np.empty((n, s, s, 3), np.uint8)
            self._masks = np.empty((n, s, s), np.uint8)
            self._boxes = np.empty((n, 4), np.int32)
            self._filled = np.zeros(n, bool)

    def __reduce__(self):  # Grain worker processes get the recipe, not the rendered cache
        return (_rebuild_source, (self.info, self._split_id, self._seed))

    def __len__(self) -> int:
        return len(self.info.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        index = int(index) % n
        label, habitat = self.info.labels[index], self.info.habitats[index]
        if self._cached and self._filled[index]:
            return {
                "image": self._images[index].copy(),
                "mask": self._masks[index].copy(),
                "bbox": self._boxes[index].copy(),
                "label": np.int32(label),
                "habitat": np.int32(habitat),
            }
        rng = np.random.default_rng([self._seed, self._split_id, index])
        example = synthetic_render.render(int(label), int(habitat), self.info.image_size, rng)
        if self._cached:  # filled last: a concurrent reader never sees a half-written example
            self._images[index], self._masks[index] = example["image"], example["mask"]
            self._boxes[index] = example["bbox"]
            self._filled[index] = True
        return example

    def __repr__(self) -> str:
        info = self.info
        return f"SyntheticSource(split={info.split!r}, n={len(self)}, size={info.image_size})"


def _rebuild_source(info: DatasetInfo, split_id: int, seed: int) -> SyntheticSource:
    return SyntheticSource(info, split_id=split_id, seed=seed)


def _int_key(config: Any, key: str, default: int, lo: int, hi: int | None = None) -> int:
    value = config.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"data.{key} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"data.{key} must be {bound}, got {value}")
    return int(value)


def _groups(seed, stream, size, num_classes, correlation):
    rng = np.random.default_rng([seed, _ASSIGN_STREAM + _SPLIT_IDS[stream]])
    return assign_groups(size, num_classes, correlation, rng)


def make_source(config: Any, split: str) -> SyntheticSource:
    """The `synthetic` dataset's factory: `config` is `config.data` (a ConfigDict or dict)."""
    num_classes = _int_key(config, "num_classes", 9, 2, MAX_CLASSES)
    image_size = _int_key(config, "image_size", 64, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    seed = _int_key(config, "seed", 0, 0)
    sizes = {
        key: _int_key(config, key, per_class * num_classes, 1)
        for key, per_class in _DEFAULT_SIZES_PER_CLASS.items()
    }
    correlation = config.get("bg_correlation", 0.9)
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float, np.floating)):
        raise ValueError(f"data.bg_correlation must be a number in [0, 1], got {correlation!r}")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"data.bg_correlation must be in [0, 1], got {correlation}")
    test_distribution = config.get("test_distribution", "balanced")
    if test_distribution not in TEST_DISTRIBUTIONS:
        raise ValueError(
            f"data.test_distribution must be one of {TEST_DISTRIBUTIONS}, got {test_distribution!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset 'synthetic'; known: {SPLITS}")

    # Evaluation splits follow `test_distribution` unless the split names its own distribution.
    part, _, distribution = split.partition("_")
    stream = "train" if split == "train" else f"{part}_{distribution or test_distribution}"
    size = sizes[f"{part}_size"]
    labels, habitats = _groups(
        seed, stream, size, num_classes, None if stream.endswith("balanced") else correlation
    )
    train_labels, train_habitats = _groups(
        seed, "train", sizes["train_size"], num_classes, correlation
    )
    train_groups = np.bincount(
        train_labels * num_classes + train_habitats, minlength=num_classes**2
    )
    info = DatasetInfo(
        name="synthetic",
        split=split,
        class_names=synthetic_render.SHAPES[:num_classes],
        labels=labels,
        habitats=habitats,
        habitat_names=synthetic_render.HABITATS[:num_classes],
        image_size=image_size,
        train_group_proportions=train_groups / train_groups.sum(),
        mean=synthetic_render.MEAN,
        std=synthetic_render.STD,
    )
    return SyntheticSource(info, split_id=_SPLIT_IDS[stream], seed=seed)
