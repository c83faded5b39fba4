"""Classification: the foreground's class, scored per background variant.

Training: soft-label cross-entropy with label smoothing and timm-style batch mixing. Evaluation
(`Evaluator`, the same for the trainer's periodic evaluation and `bgjax eval`): per-example
predictions of every variant, from which `summarize` computes accuracy per variant, the BG-gap
(Xiao et al., ICLR 2021), label x habitat groups (worst-group and training-weighted average
accuracy), per-class accuracy and the fg/bg bucket table.

Every variant walks the same pipeline in index order, so row i of every variant is image i's
foreground (MIXED_RAND keeps the foreground, swaps the background), which is what aligns the
per-image predictions for the bucket table. The pipeline pads the last batch; padding rows carry
valid=False and are never counted. The jitted step is sharded over the mesh and returns
replicated predictions, so every process holds all of them.

A 1000-class ImageNet model is scored on IN-9 by the reference rule: top-1 over the 1000 logits
mapped to IN-9, unmapped classes wrong (`metrics.IMAGENET_TO_IN9`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bgjax import metrics, parallel, xla_options
from bgjax.data import pipeline
from bgjax.masks import MaskSource
from bgjax.tasks import records

NAME = "classify"
MASKS_ARE_TARGETS = False
# What `bgjax eval` (`tasks.score`) asks of the Evaluator beyond the trainer's evaluation.
SCORE_OPTIONS = dict(with_records=True)


def create(name: str, num_classes: int, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    from bgjax import models

    return models.create(name, num_classes, rngs=rngs, **overrides)


def load_init_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> None:
    """timm weights into `model`; a head of another class count stays as initialised."""
    from bgjax.models import timm_io

    heads = [np.shape(v)[0] for k, v in weights.items() if k in timm_io.HEAD_KEYS]
    skip = timm_io.HEAD_KEYS if any(n != model.num_classes for n in heads) else ()
    timm_io.load_timm_state_dict(model, weights, skip=skip)


def check_config(config) -> None:
    """Nothing beyond the trainer's own checks."""


def eval_data(config):
    """The data a trained classifier is evaluated on: its training data (config.data)."""
    return config.data


# ---------------------------------------------------------------------------------------------
# Training


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix_batch(key, images, masks, targets, *, mixup_alpha: float, cutmix_alpha: float, switch_prob):
    """timm-style batch mixing with the flipped batch: mixup (blend) or cutmix (paste a box),
    one lam per batch. Masks follow the pixels (mixup: the union of both foregrounds). Early-
    masked runs pass images already masked (`bgjax.train`), as the masking paper's code mixes
    masked images: a pixel in one foreground only is that image at weight lam and the fill."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, masks, targets
    k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
    use_cutmix = (
        jax.random.uniform(k_switch) < switch_prob
        if mixup_alpha > 0 and cutmix_alpha > 0
        else jnp.asarray(cutmix_alpha > 0)
    )
    flipped = lambda x: None if x is None else x[::-1]
    _, height, width = images.shape[:3]
    # cutmix: a box of area (1 - lam) at a uniform centre, clipped; lam corrected to the clip.
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    cut = jnp.sqrt(1.0 - lam_cut)
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([height, width])
    y0, y1 = jnp.clip(cy - cut * height / 2, 0, height), jnp.clip(cy + cut * height / 2, 0, height)
    x0, x1 = jnp.clip(cx - cut * width / 2, 0, width), jnp.clip(cx + cut * width / 2, 0, width)
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (
        (ys >= jnp.floor(y0)) & (ys < jnp.floor(y1)) & (xs >= jnp.floor(x0)) & (xs < jnp.floor(x1))
    )
    lam_cut = 1.0 - box.mean()
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    cut_images = jnp.where(box[None, :, :, None], flipped(images), images)
    mix_images = lam_mix * images + (1.0 - lam_mix) * flipped(images)
    images = jnp.where(use_cutmix, cut_images, mix_images)
    if masks is not None:
        cut_masks = jnp.where(box[None], flipped(masks), masks)
        masks = jnp.where(use_cutmix, cut_masks, jnp.maximum(masks, flipped(masks)))
    targets = lam * targets + (1.0 - lam) * flipped(targets)
    return images, masks, targets


def targets(config, num_classes: int, key, batch, images, masks):
    """(images, masks, soft targets, labels) of a train batch, after label smoothing and mixing."""
    lcfg = config.loss
    labels = batch["label"]
    soft = soft_targets(labels, num_classes, lcfg.label_smoothing)
    images, masks, soft = mix_batch(
        key, images, masks, soft, mixup_alpha=lcfg.mixup_alpha, cutmix_alpha=lcfg.cutmix_alpha,
        switch_prob=lcfg.switch_prob,
    )  # fmt: skip
    return images, masks, soft, labels


def example_losses(config, logits, soft_targets):
    """Soft-label cross-entropy of every row (group DRO weighs them by group)."""
    return optax.softmax_cross_entropy(logits, soft_targets)


def loss(config, logits, soft_targets):
    """Soft-label cross-entropy."""
    return example_losses(config, logits, soft_targets).mean()


def accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# ---------------------------------------------------------------------------------------------
# Evaluation


def imagenet_head(model_classes: int, info) -> bool:
    """Whether predictions go through the IN-1000 -> IN-9 mapping (and a clear error if the
    model's classes cannot be scored on the dataset)."""
    if model_classes == info.num_classes:
        return False
    if model_classes == 1000 and info.num_classes == len(metrics.IN9_CLASSES):
        return True
    raise ValueError(
        f"a {model_classes}-class model cannot be scored on {info.name!r} "
        f"({info.num_classes} classes); only 1000-class ImageNet models map onto IN-9"
    )


def check_label_space(train_info, eval_info, *, by_index: bool = False) -> None:
    """ValueError unless the run's classes are the evaluation data's: same count and names
    (`by_index`: same count only; a 1000-class ImageNet model maps onto IN-9)."""
    train, other = tuple(train_info.class_names), tuple(eval_info.class_names)
    where = f"run trained on {train_info.name!r} ({len(train)} classes)"
    if len(train) != len(other):
        if len(train) == 1000 and len(other) == len(metrics.IN9_CLASSES):
            return  # the one mapping between class counts (`imagenet_head`)
        raise ValueError(
            f"{where} cannot be scored on {eval_info.name!r} ({len(other)} classes: "
            f"{', '.join(other[:4])}{', ...' if len(other) > 4 else ''}): the label spaces "
            "differ. Evaluate on data labelled with the run's classes (e.g. Waterbirds with "
            "--config.data.label=species for a CUB run)"
        )
    if not by_index and train != other:
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(train, other)) if a != b]
        raise ValueError(
            f"{where} cannot be scored on {eval_info.name!r}: class names differ ({len(diff)} "
            f"of {len(train)}, e.g. {'; '.join(diff[:3])}). Pass --label_map=by_index to "
            "score class i as class i"
        )


def example_index(num_batches: int, batch_size: int, process_count: int) -> np.ndarray:
    """Example index of every global row: global batch k is the processes' local batches in
    process order, and process p holds examples p, p + P, p + 2P, ... (`pipeline._shard`).
    Padding rows get indices past the end; they are dropped by `valid` anyway."""
    local = batch_size // process_count
    k, p, j = np.meshgrid(
        np.arange(num_batches), np.arange(process_count), np.arange(local), indexing="ij"
    )
    return (p + process_count * (k * local + j)).reshape(-1)


class Evaluator:
    """Per-example predictions of a classifier on background variants, and their summary.

    graphdef: the model's graph, merged in the step with `params` and `rest` (any split of
    its state). masked: whether the model takes masks (config.model.masking != "none").
    mask_source: where those masks come from (the batch's, or a segmenter's prediction).
    """

    def __init__(
        self,
        graphdef,
        mesh: jax.sharding.Mesh,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        masked: bool,
        mask_source: MaskSource | None = None,
    ):
        self.graphdef, self.mesh, self.num_classes = graphdef, mesh, num_classes
        self.mean, self.std, self.masked = tuple(mean), tuple(std), masked
        self.mask_source = mask_source or MaskSource()
        self._steps = {}  # imagenet_to_in9 -> the jitted step

    def _step(self, imagenet_to_in9: bool):
        if imagenet_to_in9 not in self._steps:
            self._steps[imagenet_to_in9] = self._make_step(imagenet_to_in9)
        return self._steps[imagenet_to_in9]

    def _make_step(self, imagenet_to_in9: bool):
        table = jnp.asarray(metrics.IMAGENET_TO_IN9) if imagenet_to_in9 else None

        def step(params, rest, batch, mask_params):
            model = nnx.merge(self.graphdef, params, rest)
            images, masks = self.mask_source.inputs(
                batch, self.mean, self.std, mask_params, masked=self.masked
            )
            logits = model(images, masks, train=False).astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            if table is not None:  # an IN-9 class's probability: the sum over its IN-1k classes
                pred = table[pred]
                probs = probs @ jax.nn.one_hot(table, len(metrics.IN9_CLASSES), dtype=probs.dtype)
            prob = jnp.take_along_axis(probs, batch["label"][:, None], axis=-1)[:, 0]
            return dict(pred=pred, label=batch["label"], habitat=batch["habitat"], prob=prob,
                        bg_index=batch["bg_index"], valid=batch["valid"])  # fmt: skip

        return jax.jit(
            step,
            out_shardings=parallel.replicated(self.mesh),
            compiler_options=xla_options.compiler_options(),
        )

    def predict(
        self, params, rest, source, variant: str, *, batch_size: int, image_size: int, seed: int,
        mask_params=None, eval_resize: pipeline.EvalResize | None = None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Per-image `pred`, `label`, `habitat` of `variant`, valid rows only, in example order
        (on several processes too), so row i of every variant is example i's foreground."""
        step = self._step(imagenet_head(self.num_classes, source.info))
        mask_params = self.mask_source.params if mask_params is None else mask_params
        batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # never a dropped example
        ds = pipeline.build(
            source, variant=variant, batch_size=batch_size, image_size=image_size, train=False,
            seed=seed, num_devices=self.mesh.size, eval_resize=eval_resize,
        )  # fmt: skip
        # Dispatch every batch before fetching any result, so the device never waits on the host.
        batches = (pipeline.to_global(b, self.mesh) for b in ds)
        rows = parallel.fetch([step(params, rest, b, mask_params) for b in batches])
        out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        valid = out.pop("valid").astype(bool)
        order = np.argsort(example_index(len(rows), batch_size, jax.process_count())[valid])
        return {k: v[valid][order] for k, v in out.items()}

    def __call__(
        self, params, rest, source, variants: Sequence[str], *, batch_size: int,
        image_size: int, seed: int, mask_params=None,
        eval_resize: pipeline.EvalResize | None = None, with_records: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """`summarize` of every variant of `source`, plus what was scored. A source with
        `variant_input` (the IN-9 release) says where each variant comes from: its released
        folder or regenerated from `source`. with_records: also the per-example rows, as
        columns under "records" (`records.write` puts them next to results.json)."""
        eval_resize = eval_resize or pipeline.EvalResize()
        inputs = {name: records.variant_input(source, name) for name in variants}
        predictions = {
            name: self.predict(
                params,
                rest,
                variant_source,
                as_variant,
                batch_size=batch_size,
                image_size=image_size,
                seed=seed,
                mask_params=mask_params,
                eval_resize=eval_resize,
            )  # fmt: skip
            for name, (variant_source, as_variant) in inputs.items()
        }
        records.check_aligned({name: src for name, (src, _) in inputs.items()})
        for name, (variant_source, _) in inputs.items():
            predictions[name].update(records.backgrounds(variant_source, predictions[name]))
        results = summarize(predictions, source.info)
        # "released": the dataset's own files as they are; "regenerated": composited by bgjax.
        results["variant_sources"] = {
            name: "released" if as_variant == "original" else "regenerated"
            for name, (_, as_variant) in inputs.items()
        }
        if with_records:
            results["records"] = records.columns(
                predictions, {k: s for k, (s, _) in inputs.items()}
            )
        results.update(
            num_examples=len(source),
            num_classes=source.info.num_classes,
            image_size=image_size,
            eval_resize=eval_resize.asdict(),
            imagenet_to_in9=imagenet_head(self.num_classes, source.info),
            variant_seed=seed,
        )
        return results


def summarize(predictions: Mapping[str, Mapping[str, np.ndarray]], info) -> dict[str, Any]:
    """results.json's metrics from per-variant predictions (`Evaluator.predict` outputs)."""
    results: dict[str, Any] = {"variants": {}}
    for name, p in predictions.items():
        results["variants"][name] = metrics.accuracy(p["pred"], p["label"])
    accs = {k: v["accuracy"] for k, v in results["variants"].items()}
    results["bg_gap"] = metrics.bg_gap(accs)

    results["groups"] = results["worst_group_accuracy"] = results["average_accuracy"] = None
    original = predictions.get("original")
    group_names = info.group_names()
    if original is not None and group_names is not None:
        groups = metrics.group_accuracies(
            original["pred"], original["label"], original["habitat"], group_names,
            info.num_habitats, group_label=info.group_labels,
        )  # fmt: skip
        results["groups"] = groups
        results["worst_group_accuracy"] = metrics.worst_group_accuracy(groups)
        if info.train_group_proportions is not None:
            results["average_accuracy"] = metrics.weighted_average_accuracy(
                groups, info.train_group_proportions
            )
    results["per_class"] = None
    if original is not None:
        results["per_class"] = metrics.per_class_accuracies(
            original["pred"], original["label"], info.class_names
        )
    results["buckets"] = None
    if {"original", "mixed_rand", "only_bg_t"} <= set(predictions):
        hits = {
            k: metrics.correct(predictions[k]["pred"], predictions[k]["label"])
            for k in ("original", "mixed_rand", "only_bg_t")
        }
        results["buckets"] = metrics.four_buckets(
            hits["original"], hits["mixed_rand"], hits["only_bg_t"]
        )
    # How often a mixed image is called by its background's class (Xiao et al.'s mixed sets).
    results["background_class_share"] = {
        name: metrics.background_class_share(p["pred"], p["bg_label"])
        for name, p in predictions.items()
        if name in ("mixed_rand", "mixed_next") and "bg_label" in p
    } or None
    return results


def log_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The trainer's logged evaluation metrics: eval/<variant>/accuracy and, when the dataset
    has groups, eval/worst_group_accuracy, eval/average_accuracy (train-proportion weighted) and
    eval/group/<class>/<habitat>/accuracy (`metric_names` lists what can appear)."""
    logged = {f"eval/{v}/accuracy": r["accuracy"] for v, r in results["variants"].items()}
    scalars = {
        "eval/worst_group_accuracy": results.get("worst_group_accuracy"),
        "eval/average_accuracy": results.get("average_accuracy"),
    }
    for name, group in (results.get("groups") or {}).items():
        scalars[f"eval/group/{name}/accuracy"] = group["accuracy"]
    # None: a group without evaluation images (then it cannot rank checkpoints either).
    logged.update({k: v for k, v in scalars.items() if v is not None})
    return logged


def metric_names(info, variants: Sequence[str]) -> tuple[str, ...]:
    """Every name `log_metrics` logs when `variants` of a dataset with `info` are evaluated
    (what `checkpoint.best_metric` may name); the group metrics come from "original"."""
    names = [f"eval/{v}/accuracy" for v in variants]
    group_names = info.group_names()
    if "original" in variants and group_names is not None:
        names.append("eval/worst_group_accuracy")
        if info.train_group_proportions is not None:
            names.append("eval/average_accuracy")
        names += [f"eval/group/{g}/accuracy" for g in group_names]
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# Results files


def markdown(results: Mapping[str, Any]) -> list[str]:
    """results.json's tables as Markdown lines."""
    pct = functools.partial(metrics.pct, digits=2)
    parts = ["| variant | accuracy (%) | images |", "|---|---:|---:|"]
    for name, v in results["variants"].items():
        parts.append(f"| {name} | {pct(v['accuracy'])} | {v['count']} |")
    if results.get("gt_masks"):
        gt = results["gt_masks"]["variants"]
        parts += ["", "| variant | accuracy, predicted masks (%) | with ground-truth masks (%) |"]
        parts.append("|---|---:|---:|")
        for name, v in results["variants"].items():
            parts.append(f"| {name} | {pct(v['accuracy'])} | {pct(gt[name]['accuracy'])} |")
    summary = {
        "BG-gap (mixed_same − mixed_rand)": results.get("bg_gap"),
        "worst-group accuracy": results.get("worst_group_accuracy"),
        "average accuracy (train-weighted)": results.get("average_accuracy"),
    }
    lines = [f"| {k} | {pct(v)} |" for k, v in summary.items() if v is not None]
    if lines:
        parts += ["", "| metric | % |", "|---|---:|", *lines]
    for title, table in (("group", results.get("groups")), ("class", results.get("per_class"))):
        if table:
            parts += ["", f"| {title} (original) | accuracy (%) | images |", "|---|---:|---:|"]
            parts += [f"| {k} | {pct(v['accuracy'])} | {v['count']} |" for k, v in table.items()]
    if results.get("buckets"):
        parts += [
            "",
            "Foreground (MIXED_RAND) vs background (ONLY_BG_T) correctness:",
            "",
            "| bucket | images | share (%) | original accuracy (%) |",
            "|---|---:|---:|---:|",
        ]
        for k, v in results["buckets"].items():
            row = f"| {k} | {v['count']} | {pct(v['fraction'])} | {pct(v['original_accuracy'])} |"
            parts.append(row)
    if results.get("background_class_share"):
        parts += ["", "| mixed variant | predicted = background's class (%) | images |"]
        parts.append("|---|---:|---:|")
        for k, v in results["background_class_share"].items():
            parts.append(f"| {k} | {pct(v['share'])} | {v['count']} |")
    return parts


def plot(results: Mapping[str, Any], path: str, title: str) -> None:
    """Accuracy per variant (and with ground-truth masks, when a segmenter gave the masks)."""
    from bgjax import plots

    series = {title: {k: v["accuracy"] for k, v in results["variants"].items()}}
    if results.get("gt_masks"):
        series["ground-truth masks"] = {
            k: v["accuracy"] for k, v in results["gt_masks"]["variants"].items()
        }
    chance = 1 / results["num_classes"] if results.get("num_classes") else None
    plots.variant_accuracy_bars(series, path, chance=chance)
