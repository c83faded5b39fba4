"""Where a classifier's foreground masks come from: the dataset ("gt") or a trained segmenter.

    config.mask_source = "gt"             # the batch's annotated masks
    config.mask_source = "runs/seg_cub"   # a `bgjax train --config segmenter.py` workdir

The masking paper (Aniraj et al., ICCVW 2023) predicts masks at test time with a segmentation
network;
early masking is only usable on real images that way. A segmenter source runs ON THE
ACCELERATOR INSIDE the classifier's jitted step: its parameters are an extra argument of the
step (frozen: under `jax.lax.stop_gradient`, never updated), the images it sees are the
classifier's already-normalised batch, and the mask is sigmoid(logit) > 0.5. No host round-trip.

    source = workdir.load_mask_source(config.mask_source, mean=info.mean, std=info.std, mesh=mesh)
    def train_step(state, batch, mask_params):
        images, masks = source.inputs(batch, info.mean, info.std, mask_params, masked=True)
    jax.jit(train_step)(state, batch, source.params)

This module is pure (no disk): `bgjax.workdir.load_mask_source` reads a segmenter's workdir.

A segmenter trained with other normalisation statistics than the classifier gets its input
re-normalised exactly (an affine map per channel), so any pair of datasets combines. A segmenter
trained at another image size sees the classifier's images resized to its own size (bilinear,
antialiased) and its mask is resized back (nearest), as a separate segmentation network (the
paper's Mask2Former) runs at its own resolution: one segmenter serves a 224-px ConvNeXt and a
518-px ViT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax.data import pipeline
from bgjax.models import masking as masking_lib
from bgjax.models import segmenter as segmenter_lib

GT = "gt"


def predict_masks(segmenter: nnx.Module, images: jax.Array) -> jax.Array:
    """(B, H, W) uint8 {0, 1} foreground of normalised NHWC `images`: sigmoid(logit) > 0.5.

    Pure and traceable: call it inside a jitted step on a segmenter merged there from its state.
    Gradients stop here (the masks are inputs to the classifier, not something it trains).
    """
    logits = segmenter(jax.lax.stop_gradient(images), train=False)
    return jax.lax.stop_gradient(segmenter_lib.predict_mask(logits))


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """A mask source. `params` is what jitted steps take as their extra argument (None for gt).

    name: "gt" or the segmenter workdir. For a segmenter: `graphdef` + `params` (its whole
    nnx state) rebuild it inside the step; `scale`/`shift` map the classifier's normalised
    pixels to the segmenter's (x * scale + shift, per channel; None when they agree).
    """

    name: str = GT
    graphdef: Any = None
    params: Any = None
    scale: tuple[float, ...] | None = None
    shift: tuple[float, ...] | None = None
    image_size: int | None = None  # the size the segmenter was trained at

    @property
    def is_gt(self) -> bool:
        return self.graphdef is None

    def predict(self, params: Any, images: jax.Array) -> jax.Array:
        """Predicted (B, H, W) uint8 masks of classifier-normalised `images`; pure."""
        if self.is_gt:
            raise ValueError("the 'gt' mask source predicts nothing: read batch['mask']")
        if self.scale is not None:
            images = images * jnp.asarray(self.scale, images.dtype) + jnp.asarray(
                self.shift, images.dtype
            )
        segmenter = nnx.merge(self.graphdef, jax.tree.map(jax.lax.stop_gradient, params))
        size = images.shape[1:3]
        if self.image_size is None or tuple(size) == (self.image_size,) * 2:
            return predict_masks(segmenter, images)
        seg_size = (images.shape[0], self.image_size, self.image_size, images.shape[3])
        resized = jax.image.resize(images, seg_size, "linear", antialias=True)
        mask = predict_masks(segmenter, resized)
        return masking_lib.resize_mask_nearest(mask, size).astype(mask.dtype)

    def masks(self, params: Any, batch: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
        """The masks a step uses: the batch's own ("gt") or the segmenter's prediction."""
        return batch["mask"] if self.is_gt else self.predict(params, images)

    def inputs(self, batch, mean, std, params: Any = None, *, masked: bool):
        """(normalised images, masks or None) of a uint8 batch: what a model's call takes.
        `params` default to `self.params` (jitted steps pass them as an argument)."""
        images = pipeline.normalize(batch["image"], mean, std)
        if not masked:
            return images, None
        return images, self.masks(self.params if params is None else params, batch, images)


def from_model(
    segmenter: nnx.Module,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    segmenter_mean: Sequence[float] | None = None,
    segmenter_std: Sequence[float] | None = None,
    name: str = "segmenter",
    image_size: int | None = None,
) -> MaskSource:
    """A source around an in-memory segmenter. `mean`/`std`: the classifier's normalisation;
    `segmenter_mean`/`segmenter_std`: the segmenter's (default: the same)."""
    graphdef, params = nnx.split(segmenter)
    scale = shift = None
    if segmenter_mean is not None or segmenter_std is not None:
        cm, cs = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        sm = np.asarray(mean if segmenter_mean is None else segmenter_mean, np.float64)
        ss = np.asarray(std if segmenter_std is None else segmenter_std, np.float64)
        if not (np.allclose(cm, sm) and np.allclose(cs, ss)):
            # x_seg = (x * cs + cm - sm) / ss
            scale = tuple(float(v) for v in cs / ss)
            shift = tuple(float(v) for v in (cm - sm) / ss)
    return MaskSource(
        name=name, graphdef=graphdef, params=params, scale=scale, shift=shift,
        image_size=image_size,
    )  # fmt: skip


def apply_model(model: nnx.Module, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Eval-mode logits of `model` on normalised images; the mask goes in only if it masks."""
    masked = getattr(model, "masking", "none") != "none"
    return model(x, mask if masked else None, train=False)
