"""A run's train state: a dict pytree of step, params (trainable), rest (frozen params, RNG
streams), opt_state, rng (key data), optionally ema (a copy of params) and group_dro_q
(group DRO's group weights, `bgjax.tasks.group_dro`), and its layout.

`make_setup(config, info, mesh)` gives its shapes and shardings without allocating anything
(the restore target), and a jitted initialiser. Shared by the trainer and by restoring a run
(`bgjax.workdir.restore`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from bgjax import data as data_lib
from bgjax import optim, parallel, tasks
from bgjax.tasks import group_dro


def trainable_filter(model: nnx.Module, config: ml_collections.ConfigDict) -> Any:
    """Everything the optimizer updates: all params, or the model's frozen-backbone subset (the
    head; after a mask before the last ViT block / ConvNeXt stage also what follows it, as in
    the masking paper's code: `head_prefixes()` of the model)."""
    return model.frozen_backbone_filter() if config.model.frozen_backbone else nnx.Param


def head_prefixes(model: nnx.Module) -> tuple[tuple[str, ...], ...]:
    """Key paths that learn at the head's rate (`optimizer.head_lr_mult`) besides
    `optimizer.head_keys`: what the model retrains after a late mask (the paper's boosted group
    holds them with the head)."""
    return model.head_prefixes() if hasattr(model, "head_prefixes") else ()


def premask_fill(model: nnx.Module, config: ml_collections.ConfigDict) -> tuple[float, ...] | None:
    """The fill with which the train step masks the batch before the task mixes it (mixup /
    cutmix), or None: the normalised per-channel value of the model's pixel masking (early, ViT
    "attn"). Early masking precedes mixing, as in the masking paper's code (timm's Mixup blends
    masked images): mixing unmasked images would show each image's background inside the
    other's foreground. The model's own masking with the mixed mask then changes nothing."""
    loss = config.get("loss") or {}
    mixes = loss.get("mixup_alpha", 0.0) > 0 or loss.get("cutmix_alpha", 0.0) > 0
    if mixes and getattr(model, "masking", "none") in ("early", "attn"):
        return model.early_fill_value
    return None


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run's state: how to build it, its layout, its optimizer."""

    graphdef: Any
    trainable: Any
    premask_fill: tuple[float, ...] | None  # see `premask_fill`
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[], dict]  # jitted; returns the state laid out as `shardings`
    abstract: dict  # ShapeDtypeStructs carrying the shardings (restore target)
    shardings: dict


def make_setup(
    config: ml_collections.ConfigDict, info: data_lib.DatasetInfo, mesh: jax.sharding.Mesh
) -> Setup:
    create = functools.partial(
        tasks.make_model, config, info.num_classes, pixel_mean=info.mean, pixel_std=info.std
    )
    abstract_model = nnx.eval_shape(create)
    trainable = trainable_filter(abstract_model, config)
    graphdef, _, _ = nnx.split(abstract_model, trainable, ...)
    tx, schedule = optim.make(
        config.optimizer, config.total_steps, head_prefixes=head_prefixes(abstract_model)
    )
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
        state.update(group_dro.initial_state(config, info))  # its weights q, when on
        return state

    abstract = jax.eval_shape(init)
    repl = parallel.replicated(mesh)
    min_size = config.get("fsdp_min_size", parallel.FSDP_MIN_SIZE)
    params_sh = parallel.state_shardings(abstract["params"], mesh, min_size)
    shardings = dict(
        step=repl,
        params=params_sh,
        rest=parallel.state_shardings(abstract["rest"], mesh, min_size),
        opt_state=parallel.mirror_shardings(
            abstract["opt_state"], abstract["params"], params_sh, mesh
        ),
        rng=repl,
    )
    if use_ema:
        shardings["ema"] = params_sh
    if group_dro.STATE_KEY in abstract:
        shardings[group_dro.STATE_KEY] = repl
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return Setup(
        graphdef=graphdef,
        trainable=trainable,
        premask_fill=premask_fill(abstract_model, config),
        tx=tx,
        schedule=schedule,
        init=jax.jit(init, out_shardings=shardings),
        abstract=abstract,
        shardings=shardings,
    )


def load_init_weights(state: dict, setup: Setup, path: str, config) -> dict:
    """Params from a timm-format checkpoint (`config.model.init`), loaded as the task says
    (a classifier's head of another class count stays as initialised; a segmenter's encoder)."""
    from bgjax.models import timm_io

    model = nnx.merge(setup.graphdef, state["params"], state["rest"])
    tasks.get(config).load_init_weights(model, timm_io.read_weights(path))
    _, params, rest = nnx.split(model, setup.trainable, ...)
    state = dict(state, params=params, rest=rest)
    if "ema" in state:
        state["ema"] = params
    return jax.device_put(state, setup.shardings)
