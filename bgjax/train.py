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

Here: the loop and the command line; the step itself is `bgjax.train_step`. The
task (`bgjax.tasks`: targets, loss, the evaluator) and the state layout (`bgjax.train_state`)
are shared with evaluation; the workdir's files are written and read by `bgjax.workdir`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from bgjax import checkpoint as checkpoint_lib
from bgjax import (
    clflags,
    config_utils,
    console,
    optim,
    parallel,
    tasks,
    train_state,
    train_step,
    xla_options,
)
from bgjax import data as data_lib
from bgjax import lock as lock_lib
from bgjax import masks as masks_lib
from bgjax import rerun as rerun_lib
from bgjax import variants as variants_lib
from bgjax import workdir as workdir_lib
from bgjax.data import augment as augment_lib
from bgjax.data import pipeline
from bgjax.metric_writer import MetricWriter
from bgjax.models import cpu_kernels, stacking, vit
from bgjax.tasks import jtt
from bgjax.train_state import Setup, make_setup

# clflags: idempotent definitions, so `bgjax demo` / tests can import several command modules.
_CONFIG = clflags.config_file("config", "Training config: cub.py[:k=v,...] (packaged) or a path")
_WORKDIR = clflags.string("workdir", None, "Directory for checkpoints, logs and config.json.")
_COORDINATOR = clflags.string(
    "coordinator_address", None, "host:port of process 0 (multi-process; env BGJAX_COORDINATOR)."
)
_NUM_PROCESSES = clflags.integer("num_processes", None, "env BGJAX_NUM_PROCESSES.")
_PROCESS_ID = clflags.integer("process_id", None, "env BGJAX_PROCESS_ID.")


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
    "model.remat": stacking.REMAT_CHOICES,
    "optimizer.wd_params": optim.WD_PARAMS,
    "checkpoint.best_mode": ("max", "min"),
    "data.eval_resize": augment_lib.EVAL_RESIZE_RULES,
    "data.interpolation": augment_lib.INTERPOLATIONS,
}


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


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
    # The Grain dataset of this process's batches as global arrays, sent to the devices ahead of
    # the step (`pipeline.on_devices`; iterated by `_train`).
    train_data: Any
    eval_source: Any  # None without periodic evaluation
    eval_resize: pipeline.EvalResize | None
    setup: Setup
    mask_source: masks_lib.MaskSource
    changes: dict[str, tuple[Any, Any]]  # config.json keys this rerun changes (allowed ones)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
    """Every check a run can fail before its first step, with nothing written: the workdir path,
    the config's values, the saved run's config (`rerun.check_same_config`), the data sources,
    the model and optimizer (built abstractly), the init weights and the mask source. Each
    failure is one line (ValueError, FileNotFoundError) naming the key, path or file at fault."""
    _check_workdir_path(workdir)
    mesh = parallel.make_mesh(config.mesh)
    check_config(config, mesh)
    rerun_lib.check_same_config(workdir, config)  # before the (maybe slow) data is opened
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
    host_batches = pipeline.build(
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
    train_data = pipeline.on_devices(
        host_batches,
        mesh,
        keys=train_step.step_batch_keys(config),
        prefetch=config.prefetch_to_device,
    )
    changes = rerun_lib.check_same_config(workdir, config, info)
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
    # train_iter's state is that of the last batch taken from it, not of the batches queued
    # behind it on the devices: saved and restored, it continues with the next unseen batch.
    resumed = ckpt.restore_latest(setup.abstract, train_iter)  # damaged steps skipped
    if resumed is not None:
        start, state = resumed
    else:
        start = 0
        state = setup.init()
        if config.model.init:
            state = train_state.load_init_weights(state, setup, config.model.init, config)

    mask_source = prepared.mask_source
    mask_params = mask_source.params
    step_fn = train_step.jit_train_step(config, setup, info, mesh, mask_source)
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
    try:
        if preemption.requested:  # SIGTERM while setting up: no step to save
            summary.update(_stopped_before_training(start))
        else:
            for step in range(start + 1, config.total_steps + 1):
                batch = next(train_iter)
                profiler.before_step(step, state)
                state, metrics = step_fn(state, batch, mask_params)
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
        train_iter.close()  # stops the prefetch thread and any worker processes
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
