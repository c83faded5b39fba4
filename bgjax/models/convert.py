"""`bgjax convert`: timm weights <-> bgjax parameter checkpoints.

Import (timm -> ours):
    bgjax convert --arch convnext_tiny --weights model.safetensors --out ckpt/ [--num_classes 9]
writes `ckpt/params` (Orbax StandardCheckpointer, the model's nnx.Param state as a plain
dict) and `ckpt/model.json` ({"arch", "num_classes", "source"}, and a ViT's "img_size"). With a
--num_classes that differs from the checkpoint's head, the head is freshly initialised. A ViT
is built at the checkpoint's own input size, or at --img_size with its position embedding
resampled (bicubic, antialiased, as timm loads pretrained weights at another resolution).

Export (ours -> timm):
    bgjax convert --to_timm --weights ckpt/ --out model.safetensors
    bgjax convert --to_timm --weights runs/vit_late [--step N | --best] --out model.safetensors
writes timm-named tensors that `timm.create_model(arch, num_classes=N).load_state_dict(...)`
accepts, from a `bgjax convert` checkpoint dir or a training workdir (its latest step, --best
by its config's best_metric, or --step N; the weights evaluation uses, EMA if the run kept
one). `.pth` inputs are read with `torch.load(weights_only=True)` only.

Weights that do not fit the architecture (another model, another width) are refused in one line
listing the missing, unexpected and mis-shaped keys (`timm_io.load_timm_state_dict`).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, logging
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import clflags
from bgjax import workdir as workdir_lib
from bgjax.models import timm_io

MODEL_JSON = "model.json"
PARAMS_DIR = "params"

# Idempotent definitions: other command modules may share a process (tests, `bgjax demo`).
_ARCH = clflags.string("arch", None, "timm model name, e.g. convnext_tiny (import mode)")
_WEIGHTS = clflags.string(
    "weights", None, "import: timm .safetensors/.pth file; --to_timm: bgjax checkpoint dir"
)
_OUT = clflags.string("out", None, "import: output dir; --to_timm: output .safetensors")
_NUM_CLASSES = clflags.integer(
    "num_classes", None, "classes of the new head (default: the checkpoint's)"
)
_IMG_SIZE = clflags.integer(
    "img_size", None, "ViT input size; pos_embed resampled to it (default: the checkpoint's)"
)
_TO_TIMM = clflags.boolean(
    "to_timm", False, "export a bgjax checkpoint dir or training workdir to timm safetensors"
)
_STEP = clflags.integer("step", None, "--to_timm from a training workdir: its step N")
_BEST = clflags.boolean("best", False, "--to_timm from a training workdir: its best step")


def save(model: nnx.Module, out_dir: str | os.PathLike, *, arch: str, source: str | None = None):
    """Write `model`'s parameters and a model.json describing how to rebuild it."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
    meta = {"arch": arch, "num_classes": int(model.num_classes), "source": source}
    if hasattr(model, "img_size"):  # a ViT's parameters fit one grid: rebuild it at that size
        meta["img_size"] = [int(s) for s in model.img_size]
    with open(os.path.join(out_dir, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=2)


def load(ckpt_dir: str | os.PathLike, **overrides) -> tuple[nnx.Module, dict]:
    """Rebuild the model saved by `save` (with constructor `overrides`); returns (model, meta)."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    meta_path = os.path.join(ckpt_dir, MODEL_JSON)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"not a bgjax checkpoint dir (no {MODEL_JSON}): {ckpt_dir}")
    with open(meta_path) as f:
        meta = json.load(f)

    def restore(model):
        state = nnx.state(model, nnx.Param)
        params_dir = os.path.join(ckpt_dir, PARAMS_DIR)
        checkpoint_lib.quiet_failed_reads()
        with ocp.StandardCheckpointer() as checkpointer:
            try:
                values = checkpointer.restore(params_dir, nnx.to_pure_dict(state))
            except ValueError as error:  # Orbax: a structure or shape mismatch
                first = (str(error).splitlines() or [""])[0][:300]
                raise ValueError(
                    f"{params_dir} does not hold a {meta['arch']!r} model as {MODEL_JSON} "
                    f"says: {first}"
                ) from None
        nnx.replace_by_pure_dict(state, values)
        nnx.update(model, state)

    if "img_size" in meta:
        overrides.setdefault("img_size", tuple(meta["img_size"]))
    model = timm_io.create_loaded(meta["arch"], meta["num_classes"], restore, **overrides)
    return model, meta


def import_timm_weights(
    arch: str,
    weights: str,
    out_dir: str,
    num_classes: int | None = None,
    img_size: int | None = None,
):
    model = timm_io.from_timm(arch, weights, num_classes=num_classes, img_size=img_size)
    save(model, out_dir, arch=arch, source=os.path.abspath(weights))
    return model


def load_run(workdir: str | os.PathLike, step: int | str | None = None) -> tuple[nnx.Module, dict]:
    """The model of a training workdir's checkpoint `step` (None: latest; "best"), with a
    model.json-like description; the weights are those evaluation uses (`workdir.restore`)."""
    run = workdir_lib.restore(workdir, step)
    meta = {"arch": run.config.model.name, "num_classes": int(run.model.num_classes)}
    return run.model, dict(meta, source=os.path.abspath(workdir), step=run.step)


def export_timm_weights(
    ckpt_dir: str, out_file: str, arch: str | None = None, step: int | str | None = None
):
    """A `bgjax convert` checkpoint dir or a training workdir (checkpoint `step`: None for the
    latest, "best", or N) -> timm safetensors."""
    if workdir_lib.is_run(ckpt_dir):
        model, meta = load_run(ckpt_dir, step)
    elif step is not None:
        raise ValueError(f"--step/--best need a training workdir; {ckpt_dir} has no config.json")
    else:
        model, meta = load(ckpt_dir)
    if arch is not None and arch != meta["arch"]:
        raise ValueError(f"--arch {arch!r} but {ckpt_dir} holds a {meta['arch']!r} model")
    if not out_file.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {out_file!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    timm_io.write_safetensors(model, out_file)
    return model, meta


def _count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WEIGHTS.value or not _OUT.value:
        raise app.UsageError("--weights and --out are required")
    if _BEST.value and _STEP.value is not None:
        raise app.UsageError("--step and --best exclude each other")
    try:
        if _TO_TIMM.value:
            step = "best" if _BEST.value else _STEP.value
            model, meta = export_timm_weights(_WEIGHTS.value, _OUT.value, _ARCH.value, step)
            arch = meta["arch"]
        else:
            if not _ARCH.value:
                raise app.UsageError("--arch is required to import timm weights")
            model = import_timm_weights(
                _ARCH.value, _WEIGHTS.value, _OUT.value, _NUM_CLASSES.value, _IMG_SIZE.value
            )
            arch = _ARCH.value
    except (FileNotFoundError, ValueError) as error:
        print(f"bgjax convert: error: {error}", file=sys.stderr)
        sys.exit(2)
    logging.info("wrote %s (%s, %d classes)", _OUT.value, arch, model.num_classes)
    print(f"{_OUT.value}: {arch}, {_count(model):,} parameters")
