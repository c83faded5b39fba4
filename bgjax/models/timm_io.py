"""Weights in and out in timm's names and layouts.

Our NNX parameter paths are timm's module paths, so the mapping is mechanical:
    path  `stages.1.blocks.0.conv_dw.kernel` <-> `stages.1.blocks.0.conv_dw.weight`
    stacked blocks (`stacking.Stack`) one block per key: `blocks.stacked.attn.qkv.kernel`[3]
          <-> `blocks.3.attn.qkv.weight`
    conv  kernel HWIO       <-> weight OIHW  (depthwise [7,7,1,C] <-> [C,1,7,7])
    dense kernel [in, out]  <-> weight [out, in]
    norm  scale             <-> weight
    BatchNorm running statistics (`nnx.BatchStat`) keep timm's names (`running_mean`,
    `running_var`); torch's `num_batches_tracked` counter is neither read nor written (torch
    fills it in on load; it matters only for momentum=None, which timm's ResNets do not use)
everything else (bias, gamma, cls_token, pos_embed, ...) keeps its name and shape.

A ViT's `pos_embed` learned on another (square) patch grid is resampled to the model's on load,
as timm's pretrained loading does (`vision_transformer.checkpoint_filter_fn`: bicubic,
antialiased): DINOv2's 518-px (37x37) table loads into a 224-px (16x16) model.

Weights are read from safetensors, or from `.pth` with `torch.load(weights_only=True)` only:
nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax.models import registry, stacking
from bgjax.models.pos_embed import fit_pos_embed

HEAD_KEYS = ("head.fc.weight", "head.fc.bias", "head.weight", "head.bias", "fc.weight", "fc.bias")
# What a timm state dict holds: parameters and BatchNorm running statistics.
STORED = nnx.Any(nnx.Param, nnx.BatchStat)
BN_COUNTER = "num_batches_tracked"


def _timm_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*parents, leaf])


def _to_timm(path: tuple, value: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return value.T
    return value


def _from_timm(path: tuple, value: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    return value


def to_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters (and BN statistics) as a timm-named, timm-laid-out dict of float32
    NumPy arrays (a `stacking.Stack`'s blocks one by one: `blocks.3.attn.qkv.weight`)."""
    flat = nnx.to_flat_state(nnx.state(model, STORED))
    return {
        _timm_key(path): np.ascontiguousarray(_to_timm(path, value))
        for stacked_path, var in flat
        for path, value in stacking.per_block(stacked_path, np.asarray(var.get_value()))
    }


def _targets(state: nnx.State) -> dict[str, tuple[tuple, nnx.Variable, int | None]]:
    """timm key -> (our per-block path, variable, block index in a stacked variable or None)."""
    targets = {}
    for stacked_path, var in nnx.to_flat_state(state):
        blocks = stacking.per_block(stacked_path, var.get_value())
        for index, (path, _) in enumerate(blocks):
            stacked = stacking.stacked_axes(stacked_path) > 0
            targets[_timm_key(path)] = (path, var, index if stacked else None)
    return targets


def load_timm_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, skip: tuple[str, ...] = ()
) -> None:
    """Copy a timm state dict into `model` in place (a `stacking.Stack` gets its blocks'
    per-block keys stacked).

    Raises ValueError naming every missing, unexpected or mis-shaped key. Keys in `skip`
    (e.g. the classifier when the class count changes) may be absent and are left untouched.
    A ViT's `pos_embed` of another grid is resampled to the model's grid (`fit_pos_embed`).
    """
    state = nnx.state(model, STORED)
    ours = _targets(state)
    given = {
        k: np.asarray(v)
        for k, v in state_dict.items()
        if k not in skip and k.rpartition(".")[2] != BN_COUNTER
    }
    if _grid_differs(model, given, ours):
        given = fit_pos_embed(model, given, antialias=True)  # timm's checkpoint_filter_fn
    missing = sorted(set(ours) - set(given) - set(skip))
    unexpected = sorted(set(given) - set(ours))
    wrong = []
    values: dict[int, tuple[nnx.Variable, dict]] = {}  # id(var) -> (var, {index: value})
    for key in sorted(set(ours) & set(given)):
        path, var, index = ours[key]
        value = _from_timm(path, given[key])
        shape = var.get_value().shape[0 if index is None else 1 :]
        if value.shape != shape:
            expects = _to_timm(path, np.empty(shape, np.uint8)).shape
            wrong.append(f"{key}: checkpoint {given[key].shape}, model expects {expects}")
            continue
        values.setdefault(id(var), (var, {}))[1][index] = value
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if wrong:
            parts.append(f"mis-shaped keys ({len(wrong)}): {'; '.join(wrong[:20])}")
        raise ValueError("timm state dict does not match the model: " + " | ".join(parts))
    for var, by_index in values.values():
        value = (
            by_index[None]
            if None in by_index
            else np.stack([by_index[i] for i in sorted(by_index)])
        )
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    nnx.update(model, state)


def _grid_differs(model, given: Mapping[str, np.ndarray], ours: Mapping[str, tuple]) -> bool:
    """Whether `given` holds a position embedding of another grid than ViT `model`'s."""
    if "pos_embed" not in given or "pos_embed" not in ours or not hasattr(model, "grid_size"):
        return False
    return given["pos_embed"].shape != ours["pos_embed"][1].get_value().shape  # never stacked


def checkpoint_img_size(model, state_dict: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """The input size a ViT checkpoint was trained at: the side of its square `pos_embed`
    grid times `model`'s patch size. None for models without one (ConvNeXt takes any size) and
    for non-square tables (loading then names the key)."""
    if "pos_embed" not in state_dict or not hasattr(model, "grid_size"):
        return None
    rows = int(np.shape(state_dict["pos_embed"])[1]) - model.num_pos_prefix_tokens
    side = math.isqrt(max(rows, 0))
    if side < 1 or side * side != rows:
        return None
    return (side * model.patch_size, side * model.patch_size)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file, or a `.pth`/`.pt`/`.bin` via `torch.load(weights_only=True)`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs PyTorch (pip install 'bgjax[parity]')") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(f"{path} holds no tensors (keys: {', '.join(list(obj)[:10])})")
        return {k: v.detach().float().numpy() for k, v in tensors.items()}
    raise ValueError(f"unsupported weights format {path!r}: use .safetensors or .pth")


def write_safetensors(model: nnx.Module, path: str | os.PathLike) -> None:
    """Export to timm names as safetensors: `timm.create_model(name).load_state_dict(...)` works."""
    from safetensors.numpy import save_file

    save_file(
        {k: v.astype(np.float32) for k, v in to_timm_state_dict(model).items()}, os.fspath(path)
    )


def _head_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
    for key in ("head.fc.weight", "head.weight", "fc.weight"):
        if key in state_dict:
            return int(np.shape(state_dict[key])[0])
    return None


def create_loaded(name: str, num_classes: int, load, **overrides) -> nnx.Module:
    """Model `name` whose values come from `load(model)`; the rest gets its usual initial values.

    The model starts abstract (shapes only), `load` sets what it has (usually every parameter),
    and whatever is still abstract (a new head, dropout RNG state) is initialised in one jitted
    call from which XLA drops every other initialiser: running all of them eagerly would cost one
    compile per parameter shape, only for the values to be overwritten.
    """
    make = lambda: registry.create(name, num_classes=num_classes, **overrides)
    model = nnx.eval_shape(make)
    load(model)
    todo = [
        (path, var)
        for path, var in nnx.to_flat_state(nnx.state(model))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if todo:

        @jax.jit
        def initial_values():
            flat = dict(nnx.to_flat_state(nnx.state(make())))
            return [flat[path].get_value() for path, _ in todo]

        for (_, var), value in zip(todo, initial_values()):
            var.set_value(value)
    return model


def from_timm(
    name: str,
    state_dict,
    num_classes: int | None = None,
    *,
    img_size: int | tuple[int, int] | None = None,
    **overrides,
):
    """Build model `name` and load a timm state dict (path or mapping) into it.

    With `num_classes` different from the checkpoint's head, or a checkpoint without a head,
    the head is freshly initialised. A ViT is built at `img_size`, its position embedding
    resampled from the checkpoint's grid as timm does; without `img_size`, at the checkpoint's
    own grid (DINOv2: 518 px). Models without a position embedding ignore `img_size`.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = read_weights(state_dict)
    ckpt_classes = _head_classes(state_dict)
    n = num_classes if num_classes is not None else (ckpt_classes or 1000)
    # Shapes only: whether `name` is a ViT, its patch size and prefix tokens.
    probe = nnx.eval_shape(lambda: registry.create(name, num_classes=n, **overrides))
    if hasattr(probe, "grid_size"):
        img_size = img_size or checkpoint_img_size(probe, state_dict)
        if img_size is not None:
            overrides["img_size"] = img_size
    # A checkpoint without a classifier (or with another class count) gets a fresh head.
    skip = HEAD_KEYS if ckpt_classes != n else ()
    load = lambda model: load_timm_state_dict(model, state_dict, skip=skip)
    return create_loaded(name, n, load, **overrides)
