"""The model registry: `create("convnext_tiny", num_classes=9, masking="early")`.

Each architecture family is one self-contained file (`convnext.py`, `resnet.py`, `vit.py`)
exposing `MODELS`, a dict from timm-style name to a constructor
`fn(*, num_classes, rngs, **overrides)`.
"""

from __future__ import annotations

import importlib
from typing import Any

from flax import nnx

_FAMILIES = ("bgjax.models.convnext", "bgjax.models.resnet", "bgjax.models.vit")


def _registry() -> dict[str, Any]:
    models: dict[str, Any] = {}
    for family in _FAMILIES:
        models.update(importlib.import_module(family).MODELS)
    return models


def names() -> tuple[str, ...]:
    return tuple(sorted(_registry()))


def create(name: str, num_classes: int = 1000, *, rngs: nnx.Rngs | None = None, **overrides):
    """Build model `name`; `overrides` are the family constructor arguments (masking, dtype...)."""
    registry = _registry()
    if name not in registry:
        close = [n for n in registry if n.split("_")[0] == name.split("_")[0]] or list(registry)
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(close))}")
    return registry[name](num_classes=num_classes, rngs=rngs or nnx.Rngs(0), **overrides)
