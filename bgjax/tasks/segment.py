"""Segmentation: the binary foreground segmenter (`bgjax/configs/segmenter.py`), whose workdir then
serves as another run's `config.mask_source` (predicted masks, as in Aniraj et al., ICCVW 2023).

Training: BCE (+ Dice) against the (B, H, W) foreground masks, which are the targets (no label
smoothing, no batch mixing). Evaluation (`Evaluator`, used by the trainer and `bgjax eval`):
pixel confusion counts summed over a variant, then foreground / background IoU, their mean and
pixel accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax import metrics, parallel, xla_options
from bgjax.data import pipeline
from bgjax.models import segmenter as segmenter_lib

NAME = "segment"
MASKS_ARE_TARGETS = True
METRICS = segmenter_lib.METRICS
# IN-9 variants whose batch mask is the VISIBLE foreground, so a segmenter can be scored on them.
# (only_bg_b / only_bg_t / no_fg remove the object but keep its mask: there it marks where the
# object was, not what is in the picture.)
SEGMENTATION_VARIANTS = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next")


def create(name: str, num_classes: int, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    """The segmenter on the encoder `name` (the class count does not apply)."""
    return segmenter_lib.create(name, rngs=rngs, **overrides)


def load_init_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> None:
    """timm classifier weights into the segmenter's encoder."""
    segmenter_lib.load_timm_encoder(model, weights)


def check_config(config) -> None:
    if config.loss.mixup_alpha or config.loss.cutmix_alpha:
        raise ValueError("task='segment' trains on masks: set loss.mixup_alpha/cutmix_alpha to 0")


def eval_data(config):
    """The data the segmenter is evaluated on: config.eval.data (e.g. IN-9L train, IN-9 eval),
    else config.data."""
    return config.eval.get("data") or config.data


def targets(config, num_classes: int, key, batch, images, masks):
    """The target is the mask itself: nothing to smooth or mix."""
    return images, masks, batch["mask"], batch["mask"]


def loss(config, logits, masks):
    return segmenter_lib.segmentation_loss(
        logits, masks, dice_weight=config.loss.get("dice_weight", 0.0)
    )


def accuracy(logits, masks):
    """Pixel accuracy."""
    return jnp.mean(segmenter_lib.predict_mask(logits) == masks)


def scorable(variants: Sequence[str]) -> tuple[list[str], list[str]]:
    """(variants a segmenter can be scored on, the others); an error if there is none."""
    names = [v for v in variants if v in SEGMENTATION_VARIANTS]
    if not names:
        raise ValueError(
            f"a segmenter is scored only on variants whose mask is the visible foreground "
            f"{SEGMENTATION_VARIANTS}; got {tuple(variants)}"
        )
    return names, [v for v in variants if v not in names]


class Evaluator:
    """Summed pixel confusion counts per variant -> IoU metrics. Same interface as the
    classifier's (`classify.Evaluator`); the segmenter takes no masks."""

    def __init__(self, graphdef, mesh, *, num_classes=None, mean, std, masked=False,
                 mask_source=None):  # fmt: skip
        self.graphdef, self.mesh = graphdef, mesh
        self.mean, self.std = tuple(mean), tuple(std)

    @functools.cached_property
    def _step(self):
        def step(params, rest, batch, mask_params):
            model = nnx.merge(self.graphdef, params, rest)
            images = pipeline.normalize(batch["image"], self.mean, self.std)
            pred = segmenter_lib.predict_mask(model(images, train=False))
            return segmenter_lib.confusion_counts(pred, batch["mask"], batch["valid"])

        return jax.jit(
            step,
            out_shardings=parallel.replicated(self.mesh),
            compiler_options=xla_options.compiler_options(),
        )

    def __call__(
        self, params, rest, source, variants: Sequence[str], *, batch_size: int,
        image_size: int, seed: int, mask_params=None,
        eval_resize: pipeline.EvalResize | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        eval_resize = eval_resize or pipeline.EvalResize()
        batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # never a dropped example
        variants, skipped = scorable(variants)
        per_variant = {}
        for variant in variants:
            ds = pipeline.build(
                source, variant=variant, batch_size=batch_size, image_size=image_size,
                train=False, seed=seed, num_devices=self.mesh.size, eval_resize=eval_resize,
            )  # fmt: skip
            totals = None
            for batch in ds:
                counts = self._step(params, rest, pipeline.to_global(batch, self.mesh), None)
                totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
            per_variant[variant] = segmenter_lib.iou_metrics(parallel.fetch(totals))
        return dict(
            task=NAME,
            variants=per_variant,
            **per_variant.get("original", {}),  # the headline numbers
            skipped_variants=skipped,
            num_examples=len(source),
            image_size=image_size,
            eval_resize=eval_resize.asdict(),
            variant_seed=seed,
        )


def log_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """{eval/<variant>/<fg_iou | bg_iou | miou | pixel_accuracy>}."""
    return {f"eval/{v}/{m}": r[m] for v, r in results["variants"].items() for m in METRICS}


def metric_names(info, variants: Sequence[str]) -> tuple[str, ...]:
    """Every name `log_metrics` logs for `variants` (what `checkpoint.best_metric` may name)."""
    return tuple(f"eval/{v}/{m}" for v in variants for m in METRICS)


def markdown(results: Mapping[str, Any]) -> list[str]:
    parts = ["| variant | fg IoU (%) | bg IoU (%) | mIoU (%) | pixel accuracy (%) |"]
    parts.append("|---|---:|---:|---:|---:|")
    for name, v in results["variants"].items():
        cells = " | ".join(metrics.pct(v[m], digits=2) for m in METRICS)
        parts.append(f"| {name} | {cells} |")
    return parts


def plot(results: Mapping[str, Any], path: str, title: str) -> None:
    from bgjax import plots

    ious = {k: v["fg_iou"] for k, v in results["variants"].items()}
    plots.variant_accuracy_bars({title: ious}, path, ylabel="fg IoU (%)")
