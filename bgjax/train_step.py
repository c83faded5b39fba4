"""The train step: (state, global batch, mask-source params) -> (state, metrics), and the
trainer's jit of it (`jit_train_step`: the state donated and pinned to its shardings; the
benchmarks time this very function).

One step: the batch normalised on the device, early masking before batch mixing, the task's
targets and loss (`bgjax.tasks`, group DRO's weights), gradients (micro-batches summed per device,
reduced once after the loop when `optimizer.grad_accum` > 1), the optax update and the EMA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax import data as data_lib
from bgjax import masks as masks_lib
from bgjax import parallel, tasks, xla_options
from bgjax.models import cpu_kernels
from bgjax.models import masking as masking_lib
from bgjax.tasks import group_dro
from bgjax.train_state import Setup


def _micro_batches(x: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B/count, ...], micro-batch i = rows i, i+count, ...: each device's
    contiguous rows stay on it, so no data moves between devices."""
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)


def _zeros(count: int) -> list[jax.Array]:
    return [jnp.zeros((), jnp.float32) for _ in range(count)]


def _vary(x: jax.Array, axes) -> jax.Array:
    """Floating state (batch statistics) made per-device inside shard_map."""
    return jax.lax.pcast(x, axes, to="varying") if jnp.issubdtype(x.dtype, jnp.floating) else x


def _average(x: jax.Array, axes) -> jax.Array:
    """Per-device floating state back to one value (the mean over devices)."""
    return jax.lax.pmean(x, axes) if jnp.issubdtype(x.dtype, jnp.floating) else x


def make_train_step(
    config: ml_collections.ConfigDict,
    setup: Setup,
    info: data_lib.DatasetInfo,
    mask_source: masks_lib.MaskSource | None = None,
) -> Callable[[dict, dict, Any], tuple[dict, dict]]:
    """(state, global batch, mask-source params) -> (state, metrics); pure, to be jitted with
    the state donated. The task (`bgjax.tasks`) gives the targets, the loss and the accuracy."""
    ocfg = config.optimizer
    accum = int(ocfg.get("grad_accum", 1))
    ema_decay = float(ocfg.get("ema_decay", 0.0))
    masked = config.model.masking != "none"
    task = tasks.get(config)
    mask_source = mask_source or masks_lib.MaskSource()
    graphdef, trainable = setup.graphdef, setup.trainable
    mesh = jax.tree.leaves(setup.shardings)[0].mesh
    axes = mesh.axis_names  # the batch is split over all of them (parallel.batch_sharding)
    compute = cpu_kernels.resolve_dtype(config.model.get("dtype", "float32"))
    # FSDP-sharded weights are cast where they lie, so their all-gathers move the compute dtype
    # (the layers would cast them after the gather); the gradients flow back in fp32.
    sharded = jax.tree.map(lambda s: any(s.spec), setup.shardings["params"])

    def to_compute_dtype(params):
        if compute == jnp.float32:
            return params
        return jax.tree.map(lambda p, cast: p.astype(compute) if cast else p, params, sharded)

    dro = group_dro.GroupDRO.from_config(config, info)  # None: every example weighs the same

    def loss_fn(params, rest, images, masks, targets, groups, dro_q):
        # copy: fresh Variables of this trace, which BatchNorm's running statistics may update
        model = nnx.merge(graphdef, to_compute_dtype(params), rest, copy=True)
        logits = model(images, mask=masks, train=True).astype(jnp.float32)
        _, _, rest = nnx.split(model, trainable, ...)  # advanced dropout / drop-path streams
        if dro is None:
            return task.loss(config, logits, targets), (rest, logits, dro_q)
        loss, dro_q = dro.loss(task.example_losses(config, logits, targets), groups, dro_q)
        return loss, (rest, logits, dro_q)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(params, carry, xs):
        grads, rest, dro_q, loss, accuracy = carry
        images, masks, targets, labels, groups = xs
        (micro_loss, (rest, logits, dro_q)), micro_grads = grad_fn(
            params, rest, images, masks, targets, groups, dro_q
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        accuracy = accuracy + task.accuracy(logits, labels)
        return (grads, rest, dro_q, loss + micro_loss, accuracy), None

    def accumulate_per_device(params, rest, xs):
        """Sums over `accum` micro-batches: (grads, rest, loss, accuracy). Each device sums its
        own rows' gradients; the one cross-device reduction follows the last micro-batch (a
        plain scan all-reduces every micro-batch's gradients inside the loop)."""
        frozen, keys, other = nnx.split_state(rest, nnx.Param, nnx.RngKey, ...)

        def per_device(params, keys, other, xs):
            # Varying params: their gradients stay per device (no psum in the transpose).
            params = jax.lax.pcast(params, axes, to="varying")
            # Each device draws its own dropout / drop-path masks, as rows of one batch do.
            index = jax.lax.axis_index(axes)
            local_keys = jax.tree.map(lambda k: jax.random.fold_in(k, index), keys)
            other = jax.tree.map(lambda x: _vary(x, axes), other)  # batch statistics
            rest = nnx.merge_state(frozen, local_keys, other)
            sums = [_vary(zero, axes) for zero in _zeros(2)]  # loss, accuracy
            carry = (jax.tree.map(jnp.zeros_like, params), rest, None, *sums)
            xs = jax.tree.map(lambda x: _micro_batches(x, accum), xs)
            step = functools.partial(micro_step, params)
            (grads, rest, _, loss, accuracy), _ = jax.lax.scan(step, carry, xs)
            _, _, other = nnx.split_state(rest, nnx.Param, nnx.RngKey, ...)
            other = jax.tree.map(lambda x: _average(x, axes), other)
            mean = functools.partial(jax.lax.pmean, axis_name=axes)
            return jax.tree.map(lambda g: g[None], grads), other, mean(loss), mean(accuracy)

        grads, other, loss, accuracy = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P(), P(axes)),
            out_specs=(P(axes), P(), P(), P()),
        )(params, keys, other, xs)
        # The mean over devices of per-device sums: all-reduced (reduce-scattered onto
        # FSDP-sharded parameters) once per step.
        grads = jax.tree.map(lambda g: g.mean(0), grads)
        return grads, nnx.merge_state(frozen, keys, other), loss, accuracy

    def train_step(state: dict, batch: dict, mask_params: Any = None) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        images, masks = mask_source.inputs(batch, info.mean, info.std, mask_params, masked=masked)
        if setup.premask_fill is not None:  # early masking precedes mixing (see train_state)
            images = masking_lib.early_mask(images, masks, setup.premask_fill)
        images, masks, targets, labels = task.targets(
            config, info.num_classes, key, batch, images, masks
        )
        params = state["params"]
        groups = labels if dro is None else dro.group_ids(batch)
        dro_q = state.get(group_dro.STATE_KEY)  # None without group DRO
        xs = (images, masks, targets, labels, groups)
        if accum == 1:  # no scan: on CPU a length-1 scan still blocks fusion (~6x slower step)
            carry = (jax.tree.map(jnp.zeros_like, params), state["rest"], dro_q, *_zeros(2))
            (grads, rest, dro_q, loss, accuracy), _ = micro_step(params, carry, xs)
        elif dro is None:
            grads, rest, loss, accuracy = accumulate_per_device(params, state["rest"], xs)
        else:  # group DRO's weights follow every micro-batch's global group losses
            carry = (jax.tree.map(jnp.zeros_like, params), state["rest"], dro_q, *_zeros(2))
            xs = jax.tree.map(lambda x: _micro_batches(x, accum), xs)
            step = functools.partial(micro_step, params)
            (grads, rest, dro_q, loss, accuracy), _ = jax.lax.scan(step, carry, xs)
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=params, rest=rest)
        new_state["opt_state"] = opt_state
        if dro is not None:
            new_state[group_dro.STATE_KEY] = dro_q
        if ema_decay > 0:  # with TF's warm-up, so early EMA weights are not stuck at init
            step = state["step"].astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            new_state["ema"] = jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params
            )
        metrics = dict(
            loss=loss / accum,
            accuracy=accuracy / accum,
            grad_norm=optax.global_norm(grads),
            param_norm=optax.global_norm(params),
        )
        return new_state, metrics

    def train_step_in_mesh(state: dict, batch: dict, mask_params: Any = None):
        # The mesh the models' `layers.constrain_batch` pins activations to.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, mask_params)

    return train_step_in_mesh


def step_batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch entries the train step reads: the rest (masks of a run that neither masks nor
    learns them: a quarter of a 224 px batch's bytes) are not sent to the devices."""
    keys = ("image", "label", "habitat", "valid")
    needs_masks = config.model.masking != "none" or tasks.get(config).MASKS_ARE_TARGETS
    return (*keys, "mask") if needs_masks else keys


def compute_summary(setup: Setup) -> str:
    """What the model computes with, as resolved for this backend (one log line per run):
    e.g. "compute bfloat16, params float32, attention cudnn, kernels xla"."""
    model = nnx.merge(setup.graphdef, setup.abstract["params"], setup.abstract["rest"])
    model = getattr(model, "encoder", model)  # the segmenter's backbone
    params = {x.dtype.name for x in jax.tree.leaves(setup.abstract["params"])}
    kernels = getattr(model, "kernels", "n/a")
    attention = getattr(model, "attn_impl", "n/a") or f"{kernels} kernel set's"
    dtype = getattr(model, "dtype", None)
    return (
        f"compute {'n/a' if dtype is None else jnp.dtype(dtype).name}, "
        f"params {'/'.join(sorted(params))}, attention {attention}, kernels {kernels}"
    )


def jit_train_step(
    config: ml_collections.ConfigDict,
    setup: Setup,
    info: data_lib.DatasetInfo,
    mesh: jax.sharding.Mesh,
    mask_source: masks_lib.MaskSource | None = None,
) -> Callable[[dict, dict, Any], tuple[dict, dict]]:
    """`make_train_step` jitted as the trainer runs it (benchmarks time this very function):
    the state donated and laid out as `setup.shardings`, the batch split over `mesh`, the
    mask-source params where they already are, metrics replicated.
    Call: `state, metrics = step(state, global_batch, mask_params)` (None without a segmenter)."""
    mask_params = None if mask_source is None else mask_source.params
    logging.info("train step: %s", compute_summary(setup))
    return jax.jit(
        make_train_step(config, setup, info, mask_source),
        in_shardings=(
            setup.shardings,
            parallel.batch_sharding(mesh),
            jax.tree.map(lambda x: x.sharding, mask_params),
        ),
        out_shardings=(setup.shardings, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=xla_options.compiler_options(),
    )
