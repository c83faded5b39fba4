"""Any timm model run by PyTorch behind our models' call interface, for scoring ImageNet models
that are not a bgjax family (MobileNet-v3, EfficientNet, DPN, ...) on the background variants
with the very pipeline and metrics of the JAX models: `bgjax eval --pretrained NAME`.

`TorchModel(x, mask=None, *, train=False)` takes normalised NHWC images like an NNX model and
returns the logits; inside the evaluator's jitted step it hands the batch to PyTorch on the host
(`jax.pure_callback`: the global batch as one NumPy array, so one process only) and runs timm's
model in eval mode, float32, without gradients, on CUDA when torch has it, else the CPU.

PyTorch and timm are the optional parity extra (`pip install 'bgjax[parity]'`), imported only
here and only when such a model is built. Weights: `.safetensors`, or `.pth` through
`torch.load(weights_only=True)` (`timm_io.read_weights`); nothing is unpickled, nothing is
downloaded (`pretrained=False`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax.models import timm_io


def _import_timm():
    try:
        import timm
        import torch
    except Exception as e:  # ImportError, or a torchvision build that does not match torch
        raise ImportError(
            f"running a timm model with PyTorch needs the parity extra "
            f"(pip install 'bgjax[parity]'): importing torch/timm failed: {e}"
        ) from e
    return timm, torch


def _checkpoint_classes(model, state_dict: Mapping[str, np.ndarray]) -> int | None:
    """Rows of the checkpoint's classifier (timm's `pretrained_cfg["classifier"]`), or None."""
    names = model.pretrained_cfg.get("classifier") or ()
    for name in (names,) if isinstance(names, str) else names:
        if f"{name}.weight" in state_dict:
            return int(np.shape(state_dict[f"{name}.weight"])[0])
    return None


class TorchModel(nnx.Module):
    """A timm PyTorch model called like our NNX classifiers (no parameters of its own: the
    torch module is a static attribute). `pretrained_normalization`: (mean, std, origin) of
    timm's pretrained config, the model's input statistics when nothing else says."""

    def __init__(self, name: str, torch_model, device: str):
        self.name = name
        self.torch_model = torch_model
        self.device = device
        self.num_classes = int(torch_model.num_classes)
        self.masking = "none"
        cfg = torch_model.pretrained_cfg
        self.pretrained_normalization = (
            (tuple(cfg["mean"]), tuple(cfg["std"]), f"timm pretrained_cfg of {name}")
            if "mean" in cfg and "std" in cfg
            else None
        )

    @classmethod
    def from_weights(cls, name: str, weights: str | os.PathLike) -> TorchModel:
        """timm's `name` built without downloading, with the state dict in `weights` (strict:
        every key of the model, no other); its class count is the checkpoint classifier's."""
        if jax.process_count() > 1:
            raise ValueError(f"{name} runs in PyTorch on one host: run it in a single process")
        timm, torch = _import_timm()
        if not timm.is_model(name):
            raise ValueError(f"unknown model {name!r}: neither a bgjax family nor a timm model")
        state_dict = timm_io.read_weights(weights)
        model = timm.create_model(name, pretrained=False)
        classes = _checkpoint_classes(model, state_dict)
        if classes is not None and classes != model.num_classes:
            model = timm.create_model(name, pretrained=False, num_classes=classes)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
        where = f"{os.fspath(weights)} does not match timm's {name}"
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # mis-shaped tensors, which torch lists one a line
            raise ValueError(f"{where}: {' '.join(str(e).split())[:1000]}") from e
        if missing or unexpected:
            raise ValueError(
                f"{where}: missing keys ({len(missing)}): {', '.join(missing[:10])} | "
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(name, model.to(device).eval(), device)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), np.float32))  # a copy
        with torch.no_grad():
            return self.torch_model(x.to(self.device)).float().cpu().numpy()

    def __call__(self, x, mask=None, *, train: bool = False):
        if mask is not None or train:
            raise ValueError(f"{self.name} (PyTorch) is scored as it is: no masks, no training")
        shape = jax.ShapeDtypeStruct((x.shape[0], self.num_classes), jnp.float32)
        return jax.pure_callback(self._forward, shape, x.astype(jnp.float32))
