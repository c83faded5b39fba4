"""Datasets: every source yields the same example dict, and is found by name from a config.

An example (what `source[i]` returns) is a dict of NumPy values:

    image    uint8  [H, W, 3]
    mask     uint8  [H, W]      foreground silhouette, values in {0, 1}
    bbox     int32  [4]         (x0, y0, x1, y1), end-exclusive pixel coordinates
    label    int32  []          foreground class
    habitat  int32  []          background class, or -1 when the dataset does not know it

Sources are Grain random-access data sources (`__len__`, `__getitem__`) and carry a `DatasetInfo`
as `.info`. Variant compositing (`bgjax.variants`) needs random access to partner examples and the
per-example labels in `info.labels`, so every source must provide them without decoding images.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

# ImageNet's normalisation statistics (timm's IMAGENET_DEFAULT_MEAN / _STD): the default of
# every dataset and of ImageNet-pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str
    class_names: tuple[str, ...]
    labels: np.ndarray  # int32 [N], the label of every example, in index order
    habitats: np.ndarray | None = None  # int32 [N] background class, None when unknown
    habitat_names: tuple[str, ...] | None = None
    image_size: int | None = None  # square size when all images share it, else None
    # Training-split group proportions (label * num_habitats + habitat), for the
    # Waterbirds-style weighted "average accuracy". None when groups are undefined.
    train_group_proportions: np.ndarray | None = None
    # Normalisation statistics conventionally used with this dataset.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Groups by another label than the class (Waterbirds scored by species: the groups stay
    # waterbird/landbird x habitat): int32 [N] and its names; None: groups by the class.
    group_labels: np.ndarray | None = None
    group_label_names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_habitats(self) -> int | None:
        return None if self.habitat_names is None else len(self.habitat_names)

    def group_names(self) -> tuple[str, ...] | None:
        """Group g = label * num_habitats + habitat, named '<class>/<habitat>' (the label and
        class: group_labels / group_label_names when set)."""
        if self.habitat_names is None:
            return None
        classes = self.group_label_names or self.class_names
        return tuple(f"{c}/{h}" for c in classes for h in self.habitat_names)


class Source(Protocol):
    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# dataset name -> "module:factory"; factory(config: ConfigDict, split: str) -> Source.
# Readers of real datasets are listed here; they are imported only when asked for.
_REGISTRY: dict[str, str] = {
    "synthetic": "bgjax.data.synthetic:make_source",
    "in9": "bgjax.data.in9:make_source",
    "in9l": "bgjax.data.in9l:make_source",
    "cub": "bgjax.data.cub:make_source",
    "waterbirds": "bgjax.data.waterbirds:make_source",
    "tfds": "bgjax.data.tfds:make_source",
}


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_source(config: Any, split: str) -> Source:
    """Build the source named `config.name` (a `config.data` ConfigDict) for `split`."""
    name = config.name
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
    module, factory = _REGISTRY[name].split(":")
    make: Callable[[Any, str], Source] = getattr(importlib.import_module(module), factory)
    return make(config, split)


def default_split(dataset: str) -> str:
    """IN-9 has only the released 'val' split; the others evaluate on 'test'."""
    return "val" if dataset == "in9" else "test"
