"""Models by timm-style name: `create("convnext_tiny", num_classes=9, masking="early")`.

Each architecture family is one self-contained file (`convnext.py`, `resnet.py`, `vit.py`)
exposing `MODELS`, a dict from timm-style name to a constructor
`fn(*, num_classes, rngs, **overrides)`; the registry over them is `registry.py`, timm
weights in and out `timm_io.py`.
"""

from __future__ import annotations

from bgjax.models.registry import create, names
from bgjax.models.timm_io import from_timm

__all__ = ["create", "from_timm", "names"]
