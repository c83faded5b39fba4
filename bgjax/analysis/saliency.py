"""Where does a classifier look? Grad-CAM and input-gradient saliency, and the share of it that
falls on the foreground ("Noise or Signal": Mixed-Rand training moves saliency onto the object).

    input gradient  |d logit_y / d x| summed over colour channels, at input resolution
    Grad-CAM        ReLU(sum_c w_c A_c), w_c = spatial mean of d logit_y / d A_c, on the last
                    feature grid (ConvNeXt: the last stage's map; ViT: the last block's patch
                    tokens as a grid; `cam_layer` picks an earlier stage / block, whose finer
                    grid suits small images: ConvNeXt's last map of a 32 px image is 1x1),
                    bilinearly upsampled to the input
    fg fraction     sum(saliency * mask) / sum(saliency) per image, averaged over the set

Gradients are taken w.r.t. the *normalised* input, through the model's own masking: with early
masking the background never reaches the network, so its input gradient is exactly zero and the
fraction exactly 1.

Grad-CAM needs the gradient w.r.t. an intermediate feature map. Rather than re-implement the
models' forward passes, a `_Tap` module is put in place of that ConvNeXt stage / ViT block
inside the traced function: it adds a zero `delta` to that layer's output (ConvNeXt) or
input (ViT) and records it, so d score / d delta is the gradient w.r.t. those features. For a
ViT the tap sits at the last block's INPUT (pytorch-grad-cam's `blocks[-1].norm1` choice): with
CLS pooling the patch tokens of the last block's output never reach the head, so their gradient
would be zero. Saliency is taken for the TRUE label.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

from bgjax import clflags, config_utils, parallel, variants, xla_options
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.masks import apply_model
from bgjax.models.stacking import Stack

# apply_fn(model, x_normalised (B,H,W,3), mask (B,H,W)) -> logits (B, num_classes)
ApplyFn = Callable
METHODS = ("input_gradient", "grad_cam")


def _label_score(logits, labels):
    """Sum over the batch of each row's logit for its label (rows are independent, so the
    gradient of the sum is every row's own gradient)."""
    return jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1).sum()


def input_gradient(apply_fn: ApplyFn, model, x, mask, labels):
    """(B, H, W) |d logit_y / d x| summed over channels."""
    grad = jax.grad(lambda x: _label_score(apply_fn(model, x, mask), labels))(x)
    return jnp.abs(grad.astype(jnp.float32)).sum(axis=-1)


class _Tap(nnx.Module):
    """Wraps a layer: adds `delta` to its output ("output") or input ("input") and keeps the
    result in `seen`, so the gradient w.r.t. `delta` is the gradient w.r.t. those features."""

    def __init__(self, inner, delta, where: str):
        self.inner = inner
        self.delta = nnx.Variable(delta)
        self.seen = nnx.Variable(jnp.zeros(()))
        self.where = where

    def __call__(self, x, *args, **kwargs):
        if self.where == "input":
            x = x + self.delta.get_value().astype(x.dtype)
            self.seen.set_value(x)
            return self.inner(x, *args, **kwargs)
        y = self.inner(x, *args, **kwargs)
        y = y + self.delta.get_value().astype(y.dtype)
        self.seen.set_value(y)
        return y


def _cam_layer(model) -> tuple[Any, str, Callable]:
    """(layer list, tap position, features -> NHWC grid) of the Grad-CAM layer of `model`."""
    if hasattr(model, "stages"):  # ConvNeXt: the last stage's feature map, already NHWC
        return model.stages, "output", lambda f: f
    if hasattr(model, "blocks") and hasattr(model, "patch_size"):  # ViT: patch tokens as grid
        prefix, patch = model.num_prefix_tokens, model.patch_size

        def to_grid(tokens, image_hw):
            h, w = image_hw[0] // patch, image_hw[1] // patch
            return tokens[:, prefix:].reshape(tokens.shape[0], h, w, tokens.shape[-1])

        return model.blocks, "input", to_grid
    raise ValueError(
        f"Grad-CAM needs a ConvNeXt (`stages`) or ViT (`blocks`, `patch_size`); got "
        f"{type(model).__name__}"
    )


def _without_remat(model) -> None:
    """Rematerialisation only saves training memory, and would re-trace the tap: off. Blocks
    stored stacked (`stacking.Stack`) become separate blocks, so a tap can sit among them."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Module) and hasattr(node, "remat"):
            node.remat = False
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "blocks", None), Stack):
            node.blocks = nnx.List(node.blocks.unstacked())


def grad_cam(graphdef, state, x, mask, labels, apply_fn: ApplyFn, layer: int = -1):
    """(B, h, w) Grad-CAM of the model `nnx.merge(graphdef, state)` at ConvNeXt stage / ViT
    block `layer` (default the last; an earlier one gives a finer grid on small images)."""

    def forward(delta):
        model = nnx.merge(graphdef, state)
        _without_remat(model)
        layers, where, _ = _cam_layer(model)
        tap = _Tap(layers[layer], delta, where)
        layers[layer] = tap
        return _label_score(apply_fn(model, x, mask), labels), tap.seen.get_value()

    shape = jax.eval_shape(lambda: forward(jnp.zeros((), jnp.float32))[1])
    delta = jnp.zeros(shape.shape, jnp.float32)
    grads, features = jax.grad(forward, has_aux=True)(delta)
    _, where, to_grid = _cam_layer(nnx.merge(graphdef, state))
    if where == "input":
        grads, features = to_grid(grads, x.shape[1:3]), to_grid(features, x.shape[1:3])
    features = features.astype(jnp.float32)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    return jax.nn.relu((weights * features).sum(axis=-1))


def upsample(cam, size: tuple[int, int]):
    """(B, h, w) -> (B, H, W), bilinear (half-pixel centres, as Grad-CAM implementations)."""
    return jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")


def foreground_fraction(saliency, mask):
    """(B,) share of each image's total saliency inside its mask; NaN for an all-zero map."""
    saliency = jnp.abs(saliency.astype(jnp.float32))
    inside = (saliency * (jnp.asarray(mask) > 0)).sum(axis=(1, 2))
    total = saliency.sum(axis=(1, 2))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)


# --------------------------------------------------------------------------------------------
# Whole sets


def saliency_maps(
    model,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    *,
    mesh,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    apply_fn: ApplyFn = apply_model,
    cam_layer: int = -1,
    methods: Sequence[str] = METHODS,
) -> dict[str, np.ndarray]:
    """{method: float32 [N, H, W]} for uint8 images, sharded over the mesh in batches."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown saliency method(s) {sorted(unknown)}; known: {METHODS}")
    graphdef, state = nnx.split(model)
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def maps(state, images, masks, labels):
        x = pipeline.normalize(images, mean, std)
        out = {}
        if "input_gradient" in methods:
            model = nnx.merge(graphdef, state)
            out["input_gradient"] = input_gradient(apply_fn, model, x, masks, labels)
        if "grad_cam" in methods:
            cam = grad_cam(graphdef, state, x, masks, labels, apply_fn, cam_layer)
            out["grad_cam"] = upsample(cam, x.shape[1:3])
        return out

    jitted = jax.jit(
        maps, out_shardings=replicated, compiler_options=xla_options.compiler_options()
    )
    n = images.shape[0]
    batch_size = -(-min(batch_size, n) // mesh.size) * mesh.size
    out: dict[str, list] = {m: [] for m in methods}
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size).clip(max=n - 1)  # pad with the last row
        args = [
            jax.make_array_from_callback(a[rows].shape, batch_sharding, lambda i, a=a[rows]: a[i])
            for a in (images, masks, labels.astype(np.int32))
        ]
        result = parallel.fetch(jitted(state, *args))
        for m in methods:
            out[m].append(result[m][: min(batch_size, n - start)])
    return {m: np.concatenate(v) for m, v in out.items()}


def summarize(maps: Mapping[str, np.ndarray], masks: np.ndarray) -> dict[str, Any]:
    """Mean foreground fraction per method (images with an all-zero map are left out), and
    the mask's share of the image: what a map spread uniformly would score."""
    out: dict[str, Any] = {
        "num_images": int(masks.shape[0]),
        "mask_area_fraction": float((masks > 0).mean()),
        "methods": {},
    }
    for name, sal in maps.items():
        frac = np.asarray(foreground_fraction(jnp.asarray(sal), jnp.asarray(masks)))
        ok = np.isfinite(frac)
        out["methods"][name] = {
            "foreground_fraction": float(frac[ok].mean()) if ok.any() else None,
            "foreground_fraction_std": float(frac[ok].std()) if ok.any() else None,
            "count": int(ok.sum()),
            "per_image": [None if not np.isfinite(f) else float(f) for f in frac],
        }
    return out


def report_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# Saliency: {report.get('model')} (masking {report.get('masking')}, trained on "
        f"{report.get('train_variant')}), step {report.get('step')}",
        "",
        f"{report['num_images']} `{report.get('variant')}` images of `{report.get('dataset')}` "
        f"{report.get('split')}; the masks cover {100 * report['mask_area_fraction']:.1f}% of "
        "the pixels (the score of a uniform map).",
        "",
        "| method | foreground fraction (%) | images |",
        "|---|---:|---:|",
    ]
    for name, m in report["methods"].items():
        frac = "—" if m["foreground_fraction"] is None else f"{100 * m['foreground_fraction']:.1f}"
        lines.append(f"| {name} | {frac} | {m['count']} |")
    return "\n".join(lines) + "\n"


def analyze(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    n: int = 64,
    variant: str = "original",
    split: str | None = None,
    batch_size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    figure_rows: int = 8,
    cam_layer: int = -1,
) -> dict[str, Any]:
    """Saliency of a workdir's checkpoint on the first `n` images of `variant`; writes
    saliency.json/.md and saliency.png (overlays) to `out_dir` (default eval/step_<N>)."""
    from bgjax import plots

    restored = workdir_lib.restore(workdir, step, overrides=overrides)
    if not restored.mask_source.is_gt:
        raise ValueError("saliency is measured against the ground-truth masks: mask_source='gt'")
    config = restored.config
    split = split or data_lib.default_split(config.data.name)
    source = data_lib.get_source(config.data, split)
    rows = pipeline.load_examples(
        source, variants.parse(variant)[0], image_size=config.data.image_size,
        seed=config.seed, limit=n, eval_resize=pipeline.EvalResize.from_config(config.data),
    )  # fmt: skip
    maps = saliency_maps(
        restored.model, rows["image"], rows["mask"], rows["label"], mesh=restored.mesh,
        mean=restored.mean, std=restored.std, batch_size=batch_size or config.eval.batch_size,
        cam_layer=cam_layer,
    )  # fmt: skip
    report = dict(restored.metadata(), split=split, variant=variant, cam_layer=cam_layer)
    report.update(summarize(maps, rows["mask"]))
    out_dir = os.fspath(out_dir or restored.out_dir())
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "saliency.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out_dir, "saliency.md"), "w") as f:
            f.write(report_markdown(report))
        names = source.info.class_names
        k = min(figure_rows, rows["image"].shape[0])
        plots.saliency_overlays(
            rows["image"][:k], {m: v[:k] for m, v in maps.items()},
            os.path.join(out_dir, "saliency.png"),
            row_labels=[names[y] for y in rows["label"][:k]],
        )  # fmt: skip
    return report


_WORKDIR = clflags.string("workdir", None, "Training workdir.")
_STEP = clflags.checkpoint_step("step")
_N = clflags.integer("n", 64, "Number of images (the first n of the split).")
_VARIANT = clflags.string("variant", "original", "Variant the saliency is measured on.")
_SPLIT = clflags.string("split", None, "Split (default: test; in9: val).")
_BATCH_SIZE = clflags.integer("batch_size", None, "Images per batch.")
_OUT = clflags.string("out", None, "Output folder (default WORKDIR/eval/step_<N>).")
_CAM_LAYER = clflags.integer(
    "cam_layer", -1, "Grad-CAM layer: ConvNeXt stage / ViT block index (-1: the last)."
)
flags_parser = config_utils.parse_flags_with_overrides  # --config.<key> of the saved run


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    parallel.initialize_distributed()
    try:
        report = analyze(
            _WORKDIR.value, _STEP.value, n=_N.value, variant=_VARIANT.value, split=_SPLIT.value,
            cam_layer=_CAM_LAYER.value,
            batch_size=_BATCH_SIZE.value, overrides=config_utils.override_flag_values(),
            out_dir=_OUT.value,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax saliency: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report_markdown(report))
