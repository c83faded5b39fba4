r"""Train a classifier (or, with config.task="segment", the foreground segmenter) from a config
file, big_vision style, readable top to bottom.

    bgjax train --config synthetic.py:arch=vit,strategy=late --workdir runs/vit_late
    python -m bgjax.train --config cub.py:size=small --workdir runs/cub \
        --config.total_steps=2000 --config.optimizer.lr=3e-4

parse -> prepare (mesh, data, model and optimizer shapes, the saved run's config: every check,
nothing written) -> lock -> restore-or-init -> loop (step, log, eval, checkpoint) -> final
checkpoint. Running the same command again resumes from the workdir's
latest complete checkpoint (model, optimizer, step, RNG and the Grain iterator position), so an
interrupted run finishes with the same parameters as an uninterrupted one. SIGTERM (preemption)
saves at the next step boundary and exits 0 (before the first step: nothing to save, it says so).

Workdir: config.json (the resolved config), dataset_info.json (classes, normalisation),
metrics.jsonl (+ TensorBoard events when tensorboardX is installed), checkpoints/<step>/.

Here: the train step (`make_train_step`, `jit_train_step`), the loop and the command line. The
task (`bgjax.tasks`: targets, loss, the evaluator) and the state layout (`bgjax.train_state`)
are shared with evaluation; the workdir's files are written and read by `bgjax.workdir`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax import checkpoint as checkpoint_lib
from bgjax import clflags, config_utils, console, optim, parallel, tasks, xla_options
from bgjax import data as data_lib
from bgjax import lock as lock_lib
from bgjax import masks as masks_lib
from bgjax import variants as variants_lib
from bgjax import workdir as workdir_lib
from bgjax.data import augment as augment_lib
from bgjax.data import pipeline
from bgjax.metric_writer import MetricWriter
from bgjax.models import cpu_kernels, vit
from bgjax.models import masking as masking_lib
from bgjax.tasks import group_dro, jtt
from bgjax.train_state import Setup, make_setup

# clflags: idempotent definitions, so `bgjax demo` / tests can import several command modules.
_CONFIG = clflags.config_file("config", "Training config: cub.py[:k=v,...] (packaged) or a path")
_WORKDIR = clflags.string("workdir", None, "Directory for checkpoints, logs and config.json.")
_COORDINATOR = clflags.string(
    "coordinator_address", None, "host:port of process 0 (multi-process; env BGJAX_COORDINATOR)."
)
_NUM_PROCESSES = clflags.integer("num_processes", None, "env BGJAX_NUM_PROCESSES.")
_PROCESS_ID = clflags.integer("process_id", None, "env BGJAX_PROCESS_ID.")


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


# ---------------------------------------------------------------------------------------------
# The train step


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


# ---------------------------------------------------------------------------------------------
# Logging


def _summarise(
    pending: list[tuple[int, dict]],
    config: ml_collections.ConfigDict,
    ckpt: checkpoint_lib.Checkpointer,
) -> dict[str, float]:
    """Mean of the pending steps' metrics; a non-finite loss or parameter stops the run."""
    values = [(step, parallel.fetch(m)) for step, m in pending]
    for step, m in values:
        for name in ("loss", "param_norm"):
            if not np.isfinite(m[name]):
                what = "loss" if name == "loss" else "parameters after the update"
                raise FloatingPointError(
                    f"non-finite {what} ({m[name]}) at step {step}; stopping without saving. "
                    + _after_nan(config, ckpt)
                )
    return {f"train/{k}": float(np.mean([m[k] for _, m in values])) for k in values[0][1]}


def _after_nan(config: ml_collections.ConfigDict, ckpt: checkpoint_lib.Checkpointer) -> str:
    """What a NaN stop leaves and what to change, true to this run's checkpoints and clipping."""
    ckpt.wait()  # a save still in flight counts as kept
    step = ckpt.latest_step()
    clip = float(config.optimizer.get("clip_norm", 0.0) or 0.0)
    fix = (
        f"lower config.optimizer.lr or config.optimizer.clip_norm (now {clip:g})"
        if clip > 0
        else "lower config.optimizer.lr or enable clipping (config.optimizer.clip_norm=1.0)"
    )
    if step is None:
        return f"No checkpoint was saved yet: {fix}, then rerun to start afresh."
    return f"Checkpoint step {step} in {ckpt.directory} is kept: {fix}, then rerun to resume."


# ---------------------------------------------------------------------------------------------
# The run


# Keys with a fixed set of values; the widest masking set (ViT's): a family refuses the
# strategies it lacks when the model is built.
CHOICES = {
    "task": tuple(tasks.TASKS),
    "model.masking": vit.MASKING_STRATEGIES,
    "model.kernels": cpu_kernels.KERNELS,
    "optimizer.wd_params": optim.WD_PARAMS,
    "checkpoint.best_mode": ("max", "min"),
    "data.eval_resize": augment_lib.EVAL_RESIZE_RULES,
    "data.interpolation": augment_lib.INTERPOLATIONS,
}


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r}: expected one of {', '.join(allowed)}")


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Errors a run would otherwise hit late (after compiling or on a checkpoint step)."""
    accum = int(config.optimizer.get("grad_accum", 1))
    per_device, rest = divmod(config.batch_size, mesh.size)
    if rest or per_device % max(accum, 1):
        raise ValueError(
            f"batch_size {config.batch_size} must split over {mesh.size} devices and "
            f"optimizer.grad_accum={accum} micro-batches per device"
        )
    for key in ("total_steps", "log_every_steps"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    flat = config_utils.flatten(config)
    for key, allowed in CHOICES.items():
        if key in flat:
            _check_choice(key, flat[key], allowed)
    weights = config.train_variant
    weights = {weights: 1.0} if isinstance(weights, str) else dict(weights)
    for name in weights:
        _check_choice("train_variant", name, variants_lib.VARIANTS)
    if min(weights.values(), default=0) < 0 or sum(weights.values()) <= 0:
        raise ValueError(
            f"config.train_variant={config.train_variant}: weights must be >= 0, some > 0"
        )
    for name in config.eval.variants:
        _check_choice("eval.variants", name, variants_lib.VARIANTS)
    tasks.get(config).check_config(config)
    if config.checkpoint.every_steps <= 0:
        raise ValueError(
            f"checkpoint.every_steps must be positive: {config.checkpoint.every_steps}"
        )


def _check_workdir_path(workdir: str) -> None:
    """--workdir must be a directory, or a path whose first existing part is one."""
    if "://" in workdir:
        return
    path = epath.Path(workdir).absolute()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise NotADirectoryError(f"--workdir {workdir}: {part} is a file, not a directory")
            return


@dataclasses.dataclass
class Prepared:
    """What `prepare` checked and built without touching the workdir."""

    mesh: jax.sharding.Mesh
    info: data_lib.DatasetInfo
    train_data: Any  # the Grain dataset of this process's batches (iterated by `_train`)
    eval_source: Any  # None without periodic evaluation
    eval_resize: pipeline.EvalResize | None
    setup: Setup
    mask_source: masks_lib.MaskSource
    changes: dict[str, tuple[Any, Any]]  # config.json keys this rerun changes (allowed ones)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
    """Every check a run can fail before its first step, with nothing written: the workdir path,
    the config's values, the saved run's config (`workdir.check_same_config`), the data sources,
    the model and optimizer (built abstractly), the init weights and the mask source. Each
    failure is one line (ValueError, FileNotFoundError) naming the key, path or file at fault."""
    _check_workdir_path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    check_config(config, mesh)
    workdir_lib.check_same_config(workdir, config)  # before the (maybe slow) data is opened
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # Data: this process's shard of the training stream; the source's info sizes the model.
    train_source = data_lib.get_source(config.data, "train")
    info = train_source.info
    train_variants = variants_lib.drawn_from(config.train_variant)
    tasks.require_masks(train_source, train_variants, config, command="bgjax train")
    eval_source = eval_resize = None
    if config.eval.every_steps:
        eval_source = data_lib.get_source(config.eval.data or config.data, config.eval.split)
        eval_resize = pipeline.EvalResize.from_config(config.data)  # goes with image_size
        tasks.require_masks(eval_source, config.eval.variants, config, command="bgjax train")
        tasks.check_best_metric(config, eval_source.info)
    train_data = pipeline.build(
        train_source,
        variant=config.train_variant,
        batch_size=config.batch_size,
        image_size=config.data.image_size,
        train=True,
        seed=config.seed,
        augment=config.augment,
        sampling=jtt.training_sampling(config.data, mesh),
        worker_count=config.data_workers,
        num_devices=mesh.size,
    )
    changes = workdir_lib.check_same_config(workdir, config, info)
    if config.model.init and not epath.Path(config.model.init).exists():
        raise FileNotFoundError(f"config.model.init: {config.model.init} does not exist")
    # Model + optimizer: shapes and shardings only; arrays when nothing can be restored.
    try:
        setup = make_setup(config, info, mesh)
    except TypeError as error:  # e.g. a model option its family does not take
        raise ValueError(f"config.model ({config.model.name}): {error}") from error
    mask_source = workdir_lib.load_mask_source(
        config.mask_source, mean=info.mean, std=info.std, mesh=mesh
    )
    return Prepared(mesh, info, train_data, eval_source, eval_resize, setup, mask_source, changes)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) in `workdir`. Returns the last logged metrics and `preempted`.

    `prepare` checks everything first: a rerun with a bad or changed config leaves the workdir
    as it was. Then the main process holds the workdir's lock (`bgjax.lock`: a second trainer
    refuses); an error is noted in DIR/failed.txt for `bgjax sweep --status`. SIGTERM is
    watched from the start: before the first step it stops the run with nothing to save."""
    with checkpoint_lib.PreemptionWatcher() as preemption:
        prepared = prepare(config, workdir)
        if preemption.requested:
            return _stopped_before_training(workdir_lib.latest_step(workdir) or 0)
        if not parallel.is_main_process():
            return _train(config, workdir, prepared, preemption)
        with lock_lib.hold(workdir):
            try:
                summary = _train(config, workdir, prepared, preemption)
            except Exception as error:
                lock_lib.record_failure(workdir, error)
                raise
            lock_lib.record_failure(workdir, None)
            return summary


def _stopped_before_training(start: int) -> dict[str, Any]:
    kept = f"checkpoint step {start} is the latest" if start else "no checkpoint yet"
    console.say(f"preempted before step {start + 1}: nothing to save ({kept}); rerun to resume")
    return {"preempted": True, "step": start}


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    prepared: Prepared,
    preemption: checkpoint_lib.PreemptionWatcher,
) -> dict[str, Any]:
    workdir = epath.Path(workdir)
    is_main = parallel.is_main_process()
    mesh, info, setup = prepared.mesh, prepared.info, prepared.setup
    eval_every, eval_source = config.eval.every_steps, prepared.eval_source
    eval_resize = prepared.eval_resize
    train_iter = iter(prepared.train_data)
    if is_main:
        for key, (old, new) in prepared.changes.items():
            console.say(f"{workdir / workdir_lib.CONFIG_FILE}: {key} {old!r} -> {new!r}")
        workdir_lib.write_run_files(workdir, config, info)

    ckpt_cfg = config.checkpoint
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        keep=ckpt_cfg.keep,
        keep_best=ckpt_cfg.keep_best,
        best_metric=ckpt_cfg.best_metric,
        best_mode=ckpt_cfg.best_mode,
        async_save=ckpt_cfg.async_save,
    )
    resumed = ckpt.restore_latest(setup.abstract, train_iter)  # damaged steps skipped
    if resumed is not None:
        start, state = resumed
    else:
        start = 0
        state = setup.init()
        if config.model.init:
            state = load_init_weights(state, setup, config.model.init, config)

    mask_source = prepared.mask_source
    mask_params = mask_source.params
    train_step = jit_train_step(config, setup, info, mesh, mask_source)
    evaluator = tasks.get(config).Evaluator(
        setup.graphdef, mesh, num_classes=info.num_classes, mean=info.mean, std=info.std,
        masked=config.model.masking != "none", mask_source=mask_source,
    )  # fmt: skip
    eval_params = "ema" if config.eval.use_ema and "ema" in setup.abstract else "params"

    writer = MetricWriter(workdir, is_main, resume_step=start)
    progress = _progress_bar(config, start, is_main)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"preempted": False}
    timer = (time.perf_counter(), start)
    profiler = xla_options.StepProfiler(config.get("profile_steps"), workdir / "profile")
    needed = step_batch_keys(config)
    try:
        if preemption.requested:  # SIGTERM while setting up: no step to save
            summary.update(_stopped_before_training(start))
        else:
            for step in range(start + 1, config.total_steps + 1):
                host = next(train_iter)
                batch = pipeline.to_global({k: v for k, v in host.items() if k in needed}, mesh)
                profiler.before_step(step, state)
                state, metrics = train_step(state, batch, mask_params)
                profiler.after_step(step, state)
                pending.append((step, metrics))

                last = step == config.total_steps
                do_eval = bool(eval_every) and (step % eval_every == 0 or last)
                do_save = step % ckpt_cfg.every_steps == 0 or last
                preempted = preemption.should_stop(step)
                if step % config.log_every_steps == 0 or do_eval or do_save or preempted:
                    logged = _summarise(pending, config, ckpt)  # raises on NaN: no save
                    pending.clear()
                    seconds = time.perf_counter() - timer[0]
                    logged["train/images_per_sec"] = (step - timer[1]) * config.batch_size / seconds
                    logged["train/lr"] = float(setup.schedule(step - 1))
                    progress.set_postfix(
                        loss=f"{logged['train/loss']:.4f}",
                        img_s=f"{logged['train/images_per_sec']:.1f}",
                    )
                    progress.update(step - progress.n)
                    eval_metrics = None
                    if do_eval:
                        results = evaluator(
                            state[eval_params], state["rest"], eval_source, config.eval.variants,
                            batch_size=config.eval.batch_size, image_size=config.data.image_size,
                            seed=config.seed, mask_params=mask_params, eval_resize=eval_resize,
                        )  # fmt: skip
                        eval_metrics = tasks.get(config).log_metrics(results)
                        logged.update(eval_metrics)
                    writer.write(step, logged)
                    summary.update(logged, step=step)
                    if do_save or preempted:
                        ckpt.save(step, state, train_iter, metrics=eval_metrics)
                    timer = (time.perf_counter(), step)  # img/s leaves out eval and saving
                if preempted:
                    ckpt.wait()
                    summary["preempted"] = True
                    message = f"preempted: saved step {step} in {ckpt.directory}; rerun to resume"
                    logging.warning(message)
                    print(message, flush=True)
                    break
    finally:
        profiler.close()
        progress.close()
        writer.close()
        ckpt.close()
    summary.setdefault("step", start)
    return summary


def _progress_bar(config, start: int, enabled: bool):
    import tqdm

    return tqdm.tqdm(
        total=config.total_steps,
        initial=start,
        disable=not (enabled and config.progress_bar),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------------------------------------
# Command line


def flags_parser(argv: Sequence[str]) -> list[str]:
    """absl's parser, after checking the config file loads and every override key exists, so
    mistakes get one clear line instead of a traceback from inside config_flags."""
    try:
        spec = config_utils.config_spec(argv)
        if spec is not None:
            config_utils.check_override_keys(config_utils.load_config(spec), argv)
        return flags.FLAGS(list(argv))
    except (flags.Error, ValueError, FileNotFoundError) as error:
        print(f"bgjax train: {error}", file=sys.stderr)
        sys.exit(2)


# What a user can act on: one line, no traceback (`--verbosity=1` logs it).
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    FloatingPointError,
    lock_lib.WorkdirLocked,
)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """`train` as `bgjax train` runs it: the exit status (0 also when preempted); a user error
    is one line on stderr."""
    try:
        train(config, workdir)
    except USER_ERRORS as error:
        logging.debug("bgjax train failed", exc_info=True)
        print(f"bgjax train: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    try:
        config = _CONFIG.value
    except OSError as error:  # config_flags defers a bad file's error: show its cause
        raise app.UsageError(f"--config could not be loaded: {error.__cause__ or error}") from None
    if config is None:
        raise app.UsageError("--config is required")
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    xla_options.enable_compilation_cache()
    sys.exit(run(config, _WORKDIR.value))


if __name__ == "__main__":
    console.quiet_libraries()  # as `bgjax train` does: library logs only with --verbosity
    app.run(main, flags_parser=flags_parser)
