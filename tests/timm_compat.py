"""`import_timm()`: import timm with the CPU PyTorch wheel this project pins (tests and
benchmarks only; the package never imports torch).

The registry's only torchvision 0.28.0 wheel is a CUDA build; against CPU torch its compiled op
library does not load and `import torchvision` fails registering fake kernels for ops that do not
exist (`operator torchvision::nms does not exist`). timm's ConvNeXt and ViT use none of those ops,
so while torchvision imports we let those registrations fail quietly, then restore torch as it was.
"""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def _tolerate_missing_torchvision_ops():
    import torch

    orig_register_fake = torch.library.register_fake
    orig_impl = torch.library.Library.impl

    def _quiet(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except RuntimeError as e:
                if "does not exist" not in str(e):
                    raise
                return lambda f: f
            return result

        return wrapper

    def register_fake(*args, **kwargs):
        deco = _quiet(orig_register_fake)(*args, **kwargs)
        return _quiet(deco) if callable(deco) else deco

    torch.library.register_fake = register_fake
    torch.library.Library.impl = _quiet(orig_impl)
    try:
        yield
    finally:
        torch.library.register_fake = orig_register_fake
        torch.library.Library.impl = orig_impl


def import_timm():
    """Return the `timm` module (raises ImportError if the parity extra is not installed)."""
    import sys

    if "timm" in sys.modules:
        return sys.modules["timm"]
    if "torchvision" not in sys.modules:
        with _tolerate_missing_torchvision_ops():
            import torchvision  # noqa: F401
    import timm

    return timm
