r"""Train a classifier (or, with config.task="segment", the foreground segmenter) from a config
file, big_vision style, readable top to bottom.

    bgjax train --config synthetic.py:arch=vit,strategy=late --workdir runs/vit_late
    python -m bgjax.train --config cub.py:size=small --workdir runs/cub \
        --config.total_steps=2000 --config.optimizer.lr=3e-4

parse -> mesh -> data -> model -> optimizer -> restore-or-init -> loop (step, log, eval,
checkpoint) -> final checkpoint. Running the same command again resumes from the workdir's
latest complete checkpoint (model, optimizer, step, RNG and the Grain iterator position), so an
interrupted run finishes with the same parameters as an uninterrupted one. SIGTERM (preemption)
saves at the next step boundary and exits 0.

Workdir: config.json (the resolved config), dataset_info.json (classes, normalisation),
metrics.jsonl (+ TensorBoard events when tensorboardX is installed), checkpoints/<step>/.

Here: the train step (`make_train_step`, `jit_train_step`), the loop and the command line. The
task (`bgjax.tasks`: targets, loss, the evaluator) and the state layout (`bgjax.train_state`)
are shared with evaluation; the workdir's files are written and read by `bgjax.workdir`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import clflags, config_utils, parallel, tasks, xla_options
from bgjax import data as data_lib
from bgjax import lock as lock_lib
from bgjax import masks as masks_lib
from bgjax import variants as variants_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.models import masking as masking_lib
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

    def loss_fn(params, rest, images, masks, targets):
        model = nnx.merge(graphdef, params, rest)
        logits = model(images, mask=masks, train=True).astype(jnp.float32)
        _, _, rest = nnx.split(model, trainable, ...)  # advanced dropout / drop-path streams
        return task.loss(config, logits, targets), (rest, logits)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: dict, batch: dict, mask_params: Any = None) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        images, masks = mask_source.inputs(batch, info.mean, info.std, mask_params, masked=masked)
        if setup.premask_fill is not None:  # early masking precedes mixing (see train_state)
            images = masking_lib.early_mask(images, masks, setup.premask_fill)
        images, masks, targets, labels = task.targets(
            config, info.num_classes, key, batch, images, masks
        )
        params = state["params"]

        def micro_step(carry, xs):
            grads, rest, loss, accuracy = carry
            images, masks, targets, labels = xs
            (micro_loss, (rest, logits)), micro_grads = grad_fn(
                params, rest, images, masks, targets
            )
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            accuracy = accuracy + task.accuracy(logits, labels)
            return (grads, rest, loss + micro_loss, accuracy), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        carry = (zeros, state["rest"], jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if accum == 1:  # no scan: on CPU a length-1 scan still blocks fusion (~6x slower step)
            (grads, rest, loss, accuracy), _ = micro_step(carry, (images, masks, targets, labels))
        else:
            xs = jax.tree.map(lambda x: _micro_batches(x, accum), (images, masks, targets, labels))
            (grads, rest, loss, accuracy), _ = jax.lax.scan(micro_step, carry, xs)
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=params, rest=rest)
        new_state["opt_state"] = opt_state
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

    return train_step


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


class MetricWriter:
    """metrics.jsonl (+ TensorBoard events if tensorboardX is installed), process 0 only."""

    def __init__(self, workdir: epath.Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.file = (workdir / "metrics.jsonl").open("a")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.info("tensorboardX is not installed: writing metrics.jsonl only")
        else:
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _summarise(pending: list[tuple[int, dict]], ckpt_dir: epath.Path) -> dict[str, float]:
    """Mean of the pending steps' metrics; a non-finite loss or parameter stops the run."""
    values = [(step, parallel.fetch(m)) for step, m in pending]
    for step, m in values:
        for name in ("loss", "param_norm"):
            if not np.isfinite(m[name]):
                what = "loss" if name == "loss" else "parameters after the update"
                raise FloatingPointError(
                    f"non-finite {what} ({m[name]}) at step {step}; stopping without saving. "
                    f"The last good checkpoint in {ckpt_dir} is kept; lower the learning rate or "
                    "enable clipping (config.optimizer.lr / clip_norm) and rerun to resume."
                )
    return {f"train/{k}": float(np.mean([m[k] for _, m in values])) for k in values[0][1]}


# ---------------------------------------------------------------------------------------------
# The run


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
    tasks.get(config).check_config(config)
    if config.checkpoint.every_steps <= 0:
        raise ValueError(
            f"checkpoint.every_steps must be positive: {config.checkpoint.every_steps}"
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or resume) in `workdir`. Returns the last logged metrics and `preempted`.

    The main process holds the workdir's lock throughout (`bgjax.lock`: a second trainer
    refuses); an error is noted in DIR/failed.txt for `bgjax sweep --status`."""
    if not parallel.is_main_process():
        return _train(config, workdir)
    with lock_lib.hold(workdir):
        try:
            summary = _train(config, workdir)
        except Exception as error:
            lock_lib.record_failure(workdir, error)
            raise
        lock_lib.record_failure(workdir, None)
        return summary


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    workdir = epath.Path(workdir)
    is_main = parallel.is_main_process()
    mesh = parallel.make_mesh(config.mesh)
    check_config(config, mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # Data: this process's shard of the training stream; the source's info sizes the model.
    train_source = data_lib.get_source(config.data, "train")
    info = train_source.info
    train_variants = variants_lib.drawn_from(config.train_variant)
    tasks.require_masks(train_source, train_variants, config, command="bgjax train")
    eval_every = config.eval.every_steps
    if eval_every:
        eval_source = data_lib.get_source(config.eval.data or config.data, config.eval.split)
        eval_resize = pipeline.EvalResize.from_config(config.data)  # goes with image_size
        tasks.require_masks(eval_source, config.eval.variants, config, command="bgjax train")
        tasks.check_best_metric(config, eval_source.info)
    train_iter = iter(
        pipeline.build(
            train_source,
            variant=config.train_variant,
            batch_size=config.batch_size,
            image_size=config.data.image_size,
            train=True,
            seed=config.seed,
            augment=config.augment,
            worker_count=config.data_workers,
            num_devices=mesh.size,
        )
    )
    if is_main:
        workdir_lib.write_run_files(workdir, config, info)

    # Model + optimizer: shapes and shardings first; arrays only when nothing can be restored.
    setup = make_setup(config, info, mesh)
    ckpt_cfg = config.checkpoint
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        keep=ckpt_cfg.keep,
        keep_best=ckpt_cfg.keep_best,
        best_metric=ckpt_cfg.best_metric,
        best_mode=ckpt_cfg.best_mode,
        async_save=ckpt_cfg.async_save,
    )
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, setup.abstract, train_iter)
        logging.info("resumed from step %d", start)
    else:
        start = 0
        state = setup.init()
        if config.model.init:
            state = load_init_weights(state, setup, config.model.init, config)

    mask_source = workdir_lib.load_mask_source(
        config.mask_source,
        mean=info.mean,
        std=info.std,
        mesh=mesh,
    )
    mask_params = mask_source.params
    train_step = jit_train_step(config, setup, info, mesh, mask_source)
    evaluator = tasks.get(config).Evaluator(
        setup.graphdef, mesh, num_classes=info.num_classes, mean=info.mean, std=info.std,
        masked=config.model.masking != "none", mask_source=mask_source,
    )  # fmt: skip
    eval_params = "ema" if config.eval.use_ema and "ema" in setup.abstract else "params"

    writer = MetricWriter(workdir, is_main)
    progress = _progress_bar(config, start, is_main)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"preempted": False}
    timer = (time.perf_counter(), start)
    try:
        with checkpoint_lib.PreemptionWatcher() as preemption:
            for step in range(start + 1, config.total_steps + 1):
                batch = pipeline.to_global(next(train_iter), mesh)
                state, metrics = train_step(state, batch, mask_params)
                pending.append((step, metrics))

                last = step == config.total_steps
                do_eval = bool(eval_every) and (step % eval_every == 0 or last)
                do_save = step % ckpt_cfg.every_steps == 0 or last
                preempted = preemption.should_stop(step)
                if step % config.log_every_steps == 0 or do_eval or do_save or preempted:
                    logged = _summarise(pending, ckpt.directory)  # raises on NaN: no save
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
    try:
        summary = train(config, _WORKDIR.value)
    except lock_lib.WorkdirLocked as error:
        print(f"bgjax train: error: {error}", file=sys.stderr)
        sys.exit(2)
    if summary["preempted"]:
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser)
