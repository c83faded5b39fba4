"""Just Train Twice (Liu et al., ICML 2021): the training examples that a short ERM run gets
wrong, upweighted in a second run. Both are ordinary runs, two stages of one sweep:

    stage 1   ERM for T steps (its `total_steps`): the identification run
    stage 2   config.data.upweight = dict(errors_of="{root}/<stage-1 run>", factor=lambda_up)

At the start of stage 2 the trainer (`training_sampling`) scores the identification run's last
checkpoint on its own training split, the original images without augmentation (resized by
the evaluation rule), and repeats the misclassified ones `factor - 1` extra times per epoch
(`bgjax.data.sampling`). The error set is cached as <identification run>/error_set.json, with
the step it came from, and reused when it matches that run's last step.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath
from flax import nnx

from bgjax import data as data_lib
from bgjax import parallel, tasks
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline, sampling

ERROR_SET_FILE = "error_set.json"


def error_set(workdir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Indices of the training examples that `workdir`'s last checkpoint misclassifies (read
    from its error_set.json when that was written for the same step; else computed and, on the
    main process, written)."""
    path = epath.Path(workdir) / ERROR_SET_FILE
    step = workdir_lib.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(
            f"data.upweight.errors_of: {workdir} has no checkpoint; train the identification "
            "run first (an earlier sweep stage)"
        )
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("step") == step:
            return np.asarray(saved["indices"], np.int64)
    run = workdir_lib.restore(workdir, step, mesh=mesh)
    source = data_lib.get_source(run.config.data, "train")
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    evaluator = run_evaluator(run, graphdef)
    predictions = evaluator.predict(
        params, rest, source, "original", batch_size=run.config.eval.batch_size,
        image_size=run.config.data.image_size, seed=run.config.seed,
        eval_resize=pipeline.EvalResize.from_config(run.config.data),
    )  # fmt: skip
    errors = np.flatnonzero(predictions["pred"] != predictions["label"])
    if parallel.is_main_process():
        record = dict(step=step, num_examples=len(source), indices=errors.tolist())
        path.write_text(json.dumps(record))
    return errors


def run_evaluator(run: workdir_lib.Restored, graphdef):
    """The task's evaluator for a restored classifier, fed as its trainer fed it."""
    return tasks.get(run.config).Evaluator(
        graphdef, run.mesh, num_classes=run.info.num_classes, mean=run.mean, std=run.std,
        masked=run.config.model.get("masking", "none") != "none", mask_source=run.mask_source,
    )  # fmt: skip


def training_sampling(data_config, mesh: jax.sharding.Mesh | None = None) -> sampling.Sampling:
    """`Sampling.from_config(data_config)`, with `upweight.errors_of` (a run's workdir) made
    that run's error set."""
    upweight = data_config.get("upweight") or {}
    errors_of = upweight.get("errors_of", "")
    plan = sampling.Sampling.from_config(data_config)
    if not errors_of:
        return plan
    if plan.upweight:
        raise ValueError("data.upweight: give file or errors_of, not both")
    errors = error_set(errors_of, mesh)
    return sampling.Sampling(plan.mode, tuple(int(i) for i in errors), plan.upweight_factor)
