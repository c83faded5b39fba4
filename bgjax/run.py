"""A training run apart from its loop: what evaluation, analyses and demos share with the trainer.

`make_model(config, num_classes)` (config.model -> a model), `make_setup` (the train state's
layout, shardings and initialiser), the task's evaluation (`make_eval_step`, `evaluate`), where
masks come from (`load_mask_source`, `masks_for_batch`) and whether the data has the masks a
run needs (`require_masks`), the workdir's config.json / dataset_info.json, and
`restore_model(workdir, step=None | "best" | int)` -> (model, config, info) without the optimizer
state. Defines no flags: importing it does not import the trainer (`bgjax.train`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import data as data_lib
from bgjax import masks as masks_lib
from bgjax import models, optim, parallel
from bgjax.data import pipeline
from bgjax.models import segmenter as segmenter_lib

# config.model keys the trainer consumes; every other key goes to the model constructor.
_TRAINER_MODEL_KEYS = ("name", "frozen_backbone", "init", "dtype")


# ---------------------------------------------------------------------------------------------
# Model


def make_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """`config.model` -> a model. Early masking fills with black in the dataset's normalisation."""
    mcfg = config.model
    overrides = {k: v for k, v in mcfg.items() if k not in _TRAINER_MODEL_KEYS}
    overrides["dtype"] = jnp.dtype(mcfg.get("dtype", "float32"))
    if pixel_mean is not None:
        overrides.setdefault("pixel_mean", tuple(pixel_mean))
        overrides.setdefault("pixel_std", tuple(pixel_std))
    rngs = rngs or nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    if is_segmenter(config):  # the encoder is config.model.name; no classes
        return segmenter_lib.create(mcfg.name, rngs=rngs, **overrides)
    return models.create(mcfg.name, num_classes, rngs=rngs, **overrides)


def trainable_filter(model: nnx.Module, config: ml_collections.ConfigDict) -> Any:
    """Everything the optimizer updates: all params, or the model's frozen-backbone subset."""
    return model.frozen_backbone_filter() if config.model.frozen_backbone else nnx.Param


def load_mask_source(
    mask_source: str,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> masks_lib.MaskSource | None:
    """None for "gt" (the batch's masks), else the segmenter of the workdir `mask_source`
    (`bgjax.masks.load`: checked against the classifier's image size and normalisation)."""
    if mask_source == masks_lib.GT:
        return None
    if image_size is None or mean is None or std is None:
        raise ValueError(f"mask_source={mask_source!r} needs the image_size/mean/std it serves")
    return masks_lib.load(mask_source, image_size=image_size, mean=mean, std=std, mesh=mesh)


def masks_for_batch(batch: Mapping[str, jax.Array], images: jax.Array, source=None, params=None):
    """The foreground masks the model sees: the batch's own, or the mask source's prediction
    from classifier-normalised `images` (`params`: the segmenter's, an argument of the jitted
    step; default: `source.params`)."""
    if source is None or source.is_gt:
        return batch["mask"]
    return source.predict(source.params if params is None else params, images)


def variant_names(variant: str | Mapping[str, float]) -> tuple[str, ...]:
    """config.train_variant (a name or {name: weight}) -> the variants it draws from."""
    if isinstance(variant, str):
        return (variant,)
    return tuple(name for name, weight in variant.items() if weight > 0)


def require_masks(
    source, variants: Sequence[str], config: ml_collections.ConfigDict | None, *, command: str
) -> None:
    """ValueError, before anything is built or compiled, when `command` (e.g. "bgjax train")
    needs foreground masks that `source` does not have (`source.has_masks` False, e.g. the
    Waterbirds release without data.cub_root, whose masks would be all ones): a masking model
    fed the dataset's masks (mask_source "gt"), the segmenter task (masks are its targets), or
    a background variant other than "original" (composited from the mask and box)."""
    if getattr(source, "has_masks", True):
        return
    needs, remedies = [], [getattr(source, "masks_hint", None) or "use a source that has them"]
    masking = "none" if config is None else config.get("model", {}).get("masking", "none")
    mask_source = masks_lib.GT if config is None else config.get("mask_source", masks_lib.GT)
    if config is not None and is_segmenter(config):
        needs.append(f"task={masks_lib.SEGMENT_TASK!r} (the masks are its targets)")
    elif masking != "none" and mask_source == masks_lib.GT:
        needs.append(f"model.masking={masking!r} with mask_source='gt'")
        remedies.append("or, for masking, set config.mask_source to a trained segmenter workdir")
    composited = [v for v in variants if v != "original"]
    if composited:
        needs.append(f"the variants {', '.join(composited)} (only 'original' needs no masks)")
    if needs:
        info = source.info
        raise ValueError(
            f"{command}: dataset {info.name!r} ({info.split} split) has no foreground masks, "
            f"but this run needs them for {'; '.join(needs)}. Provide them: "
            f"{'; '.join(remedies)}."
        )


# ---------------------------------------------------------------------------------------------
# Tasks: "classify" (default) or "segment" (the foreground segmenter of configs/segmenter.py,
# whose workdir then serves as another run's config.mask_source). They differ in the model,
# the target, the loss and the evaluation counts; everything else is shared.


def is_segmenter(config: ml_collections.ConfigDict) -> bool:
    return config.get("task", "classify") == masks_lib.SEGMENT_TASK


def eval_counts(config, logits, batch) -> dict[str, jax.Array]:
    """Counts over the valid rows of a batch, summed over the evaluation set."""
    if is_segmenter(config):
        pred = segmenter_lib.predict_mask(logits)
        return segmenter_lib.confusion_counts(pred, batch["mask"], batch["valid"])
    hits = (jnp.argmax(logits, -1) == batch["label"]) & batch["valid"]
    return dict(correct=hits.sum(), count=batch["valid"].sum())


def eval_metrics(config, totals: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Summed counts -> {accuracy}, or the segmenter's {fg_iou, bg_iou, miou, pixel_accuracy}."""
    if is_segmenter(config):
        return segmenter_lib.iou_metrics(totals)
    return {"accuracy": float(totals["correct"]) / max(1, int(totals["count"]))}


# ---------------------------------------------------------------------------------------------
# Train state: a dict pytree of step, params (trainable), rest (frozen params, RNG streams),
# opt_state, rng (key data) and optionally ema (a copy of params).


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run's state: how to build it, its layout, its optimizer."""

    graphdef: Any
    trainable: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[], dict]  # jitted; returns the state laid out as `shardings`
    abstract: dict  # ShapeDtypeStructs carrying the shardings (restore target)
    shardings: dict


def make_setup(
    config: ml_collections.ConfigDict, info: data_lib.DatasetInfo, mesh: jax.sharding.Mesh
) -> Setup:
    create = functools.partial(
        make_model, config, info.num_classes, pixel_mean=info.mean, pixel_std=info.std
    )
    abstract_model = nnx.eval_shape(create)
    trainable = trainable_filter(abstract_model, config)
    graphdef, _, _ = nnx.split(abstract_model, trainable, ...)
    tx, schedule = optim.make(config.optimizer, config.total_steps)
    use_ema = config.optimizer.get("ema_decay", 0.0) > 0

    def init() -> dict:
        _, params, rest = nnx.split(create(), trainable, ...)
        state = dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(config.seed + 2)),
        )
        if use_ema:
            state["ema"] = params
        return state

    abstract = jax.eval_shape(init)
    repl = parallel.replicated(mesh)
    params_sh = parallel.state_shardings(abstract["params"], mesh)
    shardings = dict(
        step=repl,
        params=params_sh,
        rest=parallel.state_shardings(abstract["rest"], mesh),
        opt_state=parallel.mirror_shardings(
            abstract["opt_state"], abstract["params"], params_sh, mesh
        ),
        rng=repl,
    )
    if use_ema:
        shardings["ema"] = params_sh
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return Setup(
        graphdef=graphdef,
        trainable=trainable,
        tx=tx,
        schedule=schedule,
        init=jax.jit(init, out_shardings=shardings),
        abstract=abstract,
        shardings=shardings,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation during training and of restored runs


def make_eval_step(config: ml_collections.ConfigDict, graphdef, info, mask_source=None):
    """(params, rest, batch, mask-source params) -> summable counts (`eval_counts`)."""
    masked = config.model.masking != "none"

    def eval_step(params, rest, batch, mask_params=None):
        model = nnx.merge(graphdef, params, rest)
        images = pipeline.normalize(batch["image"], info.mean, info.std)
        masks = masks_for_batch(batch, images, mask_source, mask_params) if masked else None
        return eval_counts(config, model(images, mask=masks, train=False), batch)

    return eval_step


def evaluate(
    eval_step: Callable,
    params,
    rest,
    mask_params,
    source,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """`eval_metrics` on `source` under each of config.eval.variants: {eval/<variant>/<name>}."""
    results = {}
    for variant in config.eval.variants:
        ds = pipeline.build(
            source,
            variant=variant,
            batch_size=config.eval.batch_size,
            image_size=config.data.image_size,
            train=False,
            seed=config.seed,
            num_devices=mesh.size,
        )
        totals = None
        for batch in ds:
            counts = eval_step(params, rest, pipeline.to_global(batch, mesh), mask_params)
            totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
        for name, value in eval_metrics(config, parallel.fetch(totals)).items():
            results[f"eval/{variant}/{name}"] = value
    return results


# ---------------------------------------------------------------------------------------------
# The workdir: config.json and dataset_info.json (written by the trainer), checkpoints/


def dataset_info_json(info: data_lib.DatasetInfo) -> str:
    """dataset_info.json: what a restored model needs of its training data (no labels)."""
    return json.dumps(
        dict(
            name=info.name,
            class_names=list(info.class_names),
            habitat_names=None if info.habitat_names is None else list(info.habitat_names),
            image_size=info.image_size,
            mean=list(info.mean),
            std=list(info.std),
        ),
        indent=2,
    )


def read_run_files(
    workdir: str | epath.PathLike,
) -> tuple[ml_collections.ConfigDict, data_lib.DatasetInfo]:
    """(config, info) of a training workdir; `info` has the classes and normalisation only."""
    workdir = epath.Path(workdir)
    for name in ("config.json", "dataset_info.json"):
        if not (workdir / name).exists():
            raise FileNotFoundError(f"{workdir / name} not found: is {workdir} a training workdir?")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    meta = json.loads((workdir / "dataset_info.json").read_text())
    info = data_lib.DatasetInfo(
        name=meta["name"],
        split="train",
        class_names=tuple(meta["class_names"]),
        labels=np.zeros((0,), np.int32),
        habitat_names=None if meta["habitat_names"] is None else tuple(meta["habitat_names"]),
        image_size=meta["image_size"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )
    return config, info


def restore_model(
    workdir: str | epath.PathLike,
    step: int | str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    use_ema: bool | None = None,
) -> tuple[nnx.Module, ml_collections.ConfigDict, data_lib.DatasetInfo]:
    """(model, config, info) from a training workdir, without the optimizer state.

    step: None = the latest checkpoint, "best" = the best by config.checkpoint.best_metric, or
    an int. mesh: where to place the parameters (default: data-parallel over all devices).
    use_ema: take the EMA weights (default: config.eval.use_ema when the run kept an EMA).
    `info` is a `DatasetInfo` with the classes and normalisation the model was trained with
    (labels empty): normalise inputs with `pipeline.normalize(images, info.mean, info.std)`.
    """
    workdir = epath.Path(workdir)
    config, info = read_run_files(workdir)
    mesh = mesh or parallel.make_mesh([("data", -1)])
    setup = make_setup(config, info, mesh)
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        best_metric=config.checkpoint.best_metric,
        best_mode=config.checkpoint.best_mode,
        read_only=True,
    )
    try:
        chosen = ckpt.best_step() if step == "best" else step
        chosen = ckpt.latest_step() if chosen is None else chosen
        if chosen is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        if use_ema is None:
            use_ema = bool(config.eval.get("use_ema", False))
        weights = "ema" if use_ema and "ema" in setup.abstract else "params"
        names = (weights, "rest")
        restored = ckpt.restore_partial(chosen, {k: setup.abstract[k] for k in names})
    finally:
        ckpt.close()
    model = nnx.merge(setup.graphdef, restored[weights], restored["rest"])
    logging.info("restored %s (%s) from %s step %s", config.model.name, weights, workdir, chosen)
    return model, config, info
