r"""`bgjax dfr`: Deep Feature Reweighting (Kirichenko et al., ICLR 2023): a trained run's last
layer re-trained on group-balanced held-out data; the result is a run like any other.

    bgjax dfr --workdir runs/wb_erm --out runs/wb_erm_dfr
    bgjax eval --workdir runs/wb_erm_dfr --variants all

The penultimate features (the classifier layer's input) of the run's last checkpoint on the
`--split` split (default val: original images, the evaluation resize, the run's masks) are
extracted once, sharded over the run's mesh, and cached as RUN/dfr/features_<split>_<step>.npz.
The split is halved at random (`--seed`). For each C of `--c_grid` a softmax regression with an
L1 penalty (the DFR paper's; sklearn's scale: sum of losses + ||W||_1 / C) is fitted on a
group-balanced subset of the first half (every label x habitat group cut to the smallest
one's size), on features standardised by that subset; the C with the best worst-group accuracy
on the second half wins. Its weights replace the classifier layer in a copy of the run: OUT
holds config.json, dataset_info.json, the checkpoint at the same step (everything else as the
run's) and dfr.json (the grid, the choice, the subset sizes), so `bgjax eval`, `bgjax aggregate`
and `workdir.restore` take it as any run.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from etils import epath
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import clflags, metrics, parallel, xla_options
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.tasks import classify
from bgjax.train_state import make_setup

# The DFR paper's grid of inverse regularisation strengths.
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
# Where each model family keeps its classifier layer (an nnx.Linear), as timm names it.
CLASSIFIER_PATHS = (("head", "fc"), ("head",), ("fc",))
DFR_FILE = "dfr.json"


def classifier_path(model: nnx.Module) -> tuple[str, ...]:
    """The attribute path of the model's classifier layer (ValueError if it has none)."""
    for path in CLASSIFIER_PATHS:
        if isinstance(_attribute(model, path), nnx.Linear):
            return path
    raise ValueError(f"{type(model).__name__} has no classifier layer at {CLASSIFIER_PATHS}")


def _attribute(model: nnx.Module, path: tuple[str, ...]) -> Any:
    node = model
    for name in path:
        node = getattr(node, name, None)
    return node


def extract_features(
    run: workdir_lib.Restored, source, *, batch_size: int, image_size: int
) -> dict[str, np.ndarray]:
    """`features` [N, D] (the classifier's input), `label`, `habitat` of every example of
    `source` (original images), in example order, on every process."""
    features_model = nnx.clone(run.model)
    *parent, name = classifier_path(features_model)
    setattr(_attribute(features_model, parent), name, None)  # the model returns its input
    graphdef, params, rest = nnx.split(features_model, nnx.Param, ...)
    masked = run.config.model.get("masking", "none") != "none"

    def step(params, rest, batch, mask_params):
        model = nnx.merge(graphdef, params, rest)
        images, masks = run.mask_source.inputs(batch, run.mean, run.std, mask_params, masked=masked)
        features = model(images, masks, train=False).astype(jnp.float32)
        return dict(features=features, label=batch["label"], habitat=batch["habitat"],
                    valid=batch["valid"])  # fmt: skip

    jitted = jax.jit(
        step,
        out_shardings=parallel.replicated(run.mesh),
        compiler_options=xla_options.compiler_options(),
    )
    batch_size = -(-batch_size // run.mesh.size) * run.mesh.size
    ds = pipeline.build(
        source, variant="original", batch_size=batch_size, image_size=image_size, train=False,
        seed=run.config.seed, num_devices=run.mesh.size,
        eval_resize=pipeline.EvalResize.from_config(run.config.data),
    )  # fmt: skip
    mask_params = run.mask_source.params
    rows = parallel.fetch(
        [jitted(params, rest, pipeline.to_global(b, run.mesh), mask_params) for b in ds]
    )
    out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    valid = out.pop("valid").astype(bool)
    index = classify.example_index(len(rows), batch_size, jax.process_count())[valid]
    order = np.argsort(index)
    return {k: v[valid][order] for k, v in out.items()}


def cached_features(run: workdir_lib.Restored, split: str, *, batch_size: int) -> dict:
    """`extract_features` of the run's `split`, read from RUN/dfr/ when already extracted."""
    path = epath.Path(run.workdir) / "dfr" / f"features_{split}_{run.step}.npz"
    if path.exists():
        with path.open("rb") as f, np.load(f, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    source = data_lib.get_source(run.config.data, split)
    features = extract_features(
        run, source, batch_size=batch_size, image_size=run.config.data.image_size
    )
    features["num_habitats"] = np.int64(source.info.num_habitats or 0)
    if parallel.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, **features)
    return features


def fit_softmax_l1(
    x: np.ndarray, y: np.ndarray, num_classes: int, c: float, *, steps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """W [D, K], b [K] minimising sum_i CE(x_i W + b, y_i) + ||W||_1 / C, by accelerated
    proximal gradient (FISTA) with the step of the loss's Lipschitz bound."""
    x = jnp.asarray(x, jnp.float32)
    onehot = jax.nn.one_hot(jnp.asarray(y), num_classes)
    params = _fista(x, onehot, jnp.float32(c), steps)
    return tuple(np.asarray(p) for p in params)


@functools.partial(jax.jit, static_argnums=3)
def _fista(x, onehot, c, steps: int):
    lipschitz = 0.5 * (jnp.linalg.norm(x, 2) ** 2 + x.shape[0])  # softmax Hessian <= 1/2
    rate, threshold = 1.0 / lipschitz, 1.0 / (c * lipschitz)

    def loss(params):
        w, b = params
        return -jnp.sum(onehot * jax.nn.log_softmax(x @ w + b))

    def body(i, carry):
        params, momentum = carry
        grads = jax.grad(loss)(momentum)
        w, b = jax.tree.map(lambda p, g: p - rate * g, momentum, grads)
        new = (jnp.sign(w) * jnp.maximum(jnp.abs(w) - threshold, 0.0), b)  # the bias is free
        beta = i / (i + 3.0)
        return new, jax.tree.map(lambda n, p: n + beta * (n - p), new, params)

    start = (jnp.zeros((x.shape[1], onehot.shape[1])), jnp.zeros((onehot.shape[1],)))
    return jax.lax.fori_loop(0, steps, body, (start, start))[0]


def balanced_subset(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with every group present cut at random to the smallest group's size."""
    present = np.unique(groups)
    smallest = min(int(np.sum(groups == g)) for g in present)
    picks = [rng.choice(np.flatnonzero(groups == g), smallest, replace=False) for g in present]
    return np.sort(np.concatenate(picks))


def worst_group_accuracy(pred, label, groups) -> float:
    return min(float(np.mean(pred[groups == g] == label[groups == g])) for g in np.unique(groups))


def reweight(
    features: dict[str, np.ndarray], num_classes: int, *, c_grid=C_GRID, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """DFR on `features` (`extract_features`): the head (W [D, K], b [K], in the unstandardised
    feature space) of the best C, and a record of the tuning."""
    num_habitats = int(features["num_habitats"])
    if num_habitats <= 0 or np.any(features["habitat"] < 0):
        raise ValueError("DFR needs label x habitat groups; this split's habitats are unknown")
    groups = features["label"] * num_habitats + features["habitat"]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    fit_half, tune_half = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])

    def fit(rows, c):
        x = features["features"][rows]
        mean, std = x.mean(0), x.std(0) + 1e-6
        w, b = fit_softmax_l1((x - mean) / std, features["label"][rows], num_classes, c)
        return w / std[:, None], b - (mean / std) @ w  # standardisation folded into the head

    subset = fit_half[balanced_subset(groups[fit_half], rng)]
    scores = {}
    for c in c_grid:
        w, b = fit(subset, c)
        pred = np.argmax(features["features"][tune_half] @ w + b, -1)
        scores[c] = worst_group_accuracy(pred, features["label"][tune_half], groups[tune_half])
    best = max(c_grid, key=lambda c: scores[c])  # max keeps the first (strongest C) of ties
    w, b = fit(subset, best)
    record = dict(
        c_grid=list(c_grid), tune_worst_group_accuracy={str(c): s for c, s in scores.items()},
        c=best, fit_examples=len(subset), tune_examples=len(tune_half), seed=seed,
    )  # fmt: skip
    return w, b, record


def write_run(run: workdir_lib.Restored, out: str | os.PathLike, w, b, record) -> None:
    """A copy of the run at its step with the classifier layer set to (w, b) in OUT."""
    out = epath.Path(out)
    source = epath.Path(run.workdir)
    info = workdir_lib.read_info(source)
    setup = make_setup(run.config, info, run.mesh)
    reader = checkpoint_lib.Checkpointer(source / workdir_lib.CHECKPOINTS, read_only=True)
    try:
        state = reader.restore(run.step, setup.abstract)
    finally:
        reader.close()
    for weights in ("params", "ema"):
        if weights in state:
            model = nnx.merge(setup.graphdef, state[weights], state["rest"])
            layer = _attribute(model, classifier_path(model))
            layer.kernel.value = jnp.asarray(w, layer.kernel.value.dtype)
            layer.bias.value = jnp.asarray(b, layer.bias.value.dtype)
            _, state[weights], _ = nnx.split(model, setup.trainable, ...)
    state = jax.device_put(state, setup.shardings)
    if parallel.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        for name in (workdir_lib.CONFIG_FILE, workdir_lib.INFO_FILE):
            (out / name).write_text((source / name).read_text())
        (out / DFR_FILE).write_text(json.dumps(dict(record, source=os.fspath(source)), indent=2))
    writer = checkpoint_lib.Checkpointer(out / workdir_lib.CHECKPOINTS, keep_best=0,
                                         async_save=False)  # fmt: skip
    try:
        writer.save(run.step, state)
    finally:
        writer.close()


def run_dfr(workdir: str, out: str, *, split: str = "val", c_grid=C_GRID, seed: int = 0,
            batch_size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """`bgjax dfr`: features (cached), the tuned head, the new run in OUT; returns dfr.json."""
    run = workdir_lib.restore(workdir)
    features = cached_features(run, split, batch_size=batch_size or run.config.eval.batch_size)
    w, b, record = reweight(features, run.info.num_classes, c_grid=c_grid, seed=seed)
    record.update(split=split, step=run.step)
    write_run(run, out, w, b, record)
    return record


_WORKDIR = clflags.string("workdir", None, "The trained run whose last layer is re-trained.")
_OUT = clflags.string("out", None, "Where the re-trained run goes (a new workdir).")
_SPLIT = clflags.string("split", None, "The held-out split DFR fits and tunes on (default val).")
_SEED = clflags.integer("seed", 0, "Seeds the halves and the balanced subset.")
_C_GRID = clflags.string("c_grid", ",".join(map(str, C_GRID)), "Inverse L1 strengths to try.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None or _OUT.value is None:
        raise app.UsageError("--workdir and --out are required")
    try:
        c_grid = tuple(float(c) for c in _C_GRID.value.split(","))
        # Another command may have defined --split first (with its default): None means val.
        record = run_dfr(_WORKDIR.value, _OUT.value, split=_SPLIT.value or "val", c_grid=c_grid,
                         seed=_SEED.value)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        print(f"bgjax dfr: error: {error}", file=sys.stderr)
        sys.exit(2)
    logging.info("dfr: %s", record)
    print(f"C = {record['c']} (worst-group accuracy on the tuning half: "
          f"{metrics.pct(record['tune_worst_group_accuracy'][str(record['c'])])}%); "
          f"wrote {_OUT.value}; evaluate it with bgjax eval --workdir {_OUT.value}")  # fmt: skip
