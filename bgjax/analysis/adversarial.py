"""Adversarial backgrounds ("Noise or Signal" §5; docs/reference.md#adversarial-backgrounds).

For every foreground (test image + mask) try ONLY_BG_T backgrounds of the whole set, all classes,
composite = background * (1 - mask) + image * mask, until one changes the prediction away from the
label. A foreground is *vulnerable* if some background does; challenge accuracy = 1 - vulnerable
fraction.

Following the reference (`challenge_eval.py`), foregrounds the model already gets wrong on the
original image are searched like every other one (no shortcut, no exclusion): they count as
vulnerable only if some composite is misclassified, which in practice is nearly always. The pool
includes the foreground's own ONLY_BG_T background, as in the reference. Backgrounds are tried in
one fixed order, a permutation drawn from `seed`, the same for every foreground.

Two searches with identical results (same vulnerable set, same first flipping background):
  * `batched_search`: rounds over the still-unflipped foregrounds; each round gives every active
    foreground its next background(s), as many as fill whole forward batches (one each while
    more foregrounds than batch rows are active, ~batch_size / active each later, so the last
    stubborn foregrounds still fill a batch; padding only when the pool runs out). A foreground
    leaves the search as soon as a round flips it (early exit); the waste is the composites it
    was given in that round past its first flip.
  * `serial_search`: the reference loop, one foreground at a time, `per_pass` backgrounds per
    forward pass (1: strictly serial; the reference uses 32), stopping at the first flip.
Both take `predict(fg_idx, bg_idx) -> predicted labels`, so they are testable without a model;
`composite_predictor` builds the jitted, sharded one for a real model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

from bgjax import clflags, config_utils, metrics, parallel, xla_options
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.masks import apply_model
from bgjax.tasks import classify

# predict(fg_idx int32[n], bg_idx int32[n]) -> int[n]: the predicted label of each composite
# (a NumPy array, or a replicated jax.Array that the searches fetch when they need it).
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class SearchResult:
    vulnerable: np.ndarray  # bool [N]
    flip_background: np.ndarray  # int32 [N] index into the pool of the first flipping one, or -1
    flip_prediction: np.ndarray  # int32 [N] the prediction it caused, or -1
    tried: np.ndarray  # int32 [N] composites evaluated per foreground
    forward_passes: int  # composites (images) through the model, padding excluded
    padded_passes: int  # extra padding rows run to keep batch shapes static
    max_backgrounds: int


def background_order(num_backgrounds: int, seed: int, max_backgrounds: int | None = None):
    """The fixed order in which every foreground tries the pool: a seeded permutation, cut at K."""
    order = np.random.default_rng(seed).permutation(num_backgrounds).astype(np.int32)
    return order if max_backgrounds is None else order[:max_backgrounds]


def _check(labels, order) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    order = np.asarray(order, np.int32)
    if labels.ndim != 1 or order.ndim != 1:
        raise ValueError(f"labels {labels.shape} and order {order.shape} must be 1-D")
    if order.size == 0:
        raise ValueError("the background pool is empty")
    return labels, order


def _host(preds) -> np.ndarray:
    """NumPy predictions from `predict`'s output: a NumPy array or a replicated jax.Array."""
    if isinstance(preds, jax.Array):
        return np.asarray(preds.addressable_data(0))
    return np.asarray(preds)


def _new_result(n: int, k: int) -> SearchResult:
    return SearchResult(
        vulnerable=np.zeros(n, bool),
        flip_background=np.full(n, -1, np.int32),
        flip_prediction=np.full(n, -1, np.int32),
        tried=np.zeros(n, np.int32),
        forward_passes=0,
        padded_passes=0,
        max_backgrounds=k,
    )


def batched_search(predict: Predict, labels, order, *, batch_size: int) -> SearchResult:
    """Early-exit search over all foregrounds at once, in forward batches of `batch_size`.

    `predict` is always called with exactly `batch_size` pairs (the last batch of a round is
    padded by repeating its first pair), so a jitted `predict` compiles once.
    """
    labels, order = _check(labels, order)
    n, k = labels.shape[0], order.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    res = _new_result(n, k)
    pos = np.zeros(n, np.int64)  # next position in `order` per foreground
    active = np.arange(n)
    while active.size:
        # The round fills whole batches: at least one background per active foreground, the
        # slots left over spread over the foregrounds (capped by what each has left to try).
        total = -(-max(active.size, batch_size) // batch_size) * batch_size
        counts = np.full(active.size, total // active.size)
        counts[: total % active.size] += 1
        counts = np.minimum(counts, k - pos[active])
        fg = np.repeat(active, counts)
        at = pos[fg] + np.arange(fg.size) - np.repeat(np.cumsum(counts) - counts, counts)
        # Every batch of the round is dispatched before any result is read (`predict` may
        # return device arrays), so an accelerator runs the round back to back.
        pending = []
        for start in range(0, fg.shape[0], batch_size):
            f, a = fg[start : start + batch_size], at[start : start + batch_size]
            pad = batch_size - f.shape[0]
            f_in = np.concatenate([f, np.full(pad, f[0])]).astype(np.int32)
            b_in = np.concatenate([order[a], np.full(pad, order[a[0]])]).astype(np.int32)
            pending.append((predict(f_in, b_in), f.shape[0]))
            res.forward_passes += f.shape[0]
            res.padded_passes += pad
        preds = np.concatenate([_host(p)[:rows] for p, rows in pending])
        np.add.at(res.tried, fg, 1)
        # Pairs are grouped by foreground in increasing position, so the first flipped pair of a
        # foreground is its first flipping background in `order`, exactly as the serial loop finds.
        flipped = np.flatnonzero(preds != labels[fg])
        first = flipped[np.unique(fg[flipped], return_index=True)[1]]
        res.vulnerable[fg[first]] = True
        res.flip_background[fg[first]] = order[at[first]]
        res.flip_prediction[fg[first]] = preds[first]
        pos[active] += counts
        active = active[~res.vulnerable[active] & (pos[active] < k)]
    return res


def serial_search(predict: Predict, labels, order, *, per_pass: int = 1) -> SearchResult:
    """The reference loop: per foreground, `per_pass` backgrounds per forward pass, in `order`,
    stopping after the first pass that flips it (the reference: `per_pass=32`)."""
    labels, order = _check(labels, order)
    n, k = labels.shape[0], order.shape[0]
    res = _new_result(n, k)
    for i in range(n):
        for start in range(0, k, per_pass):
            bgs = order[start : start + per_pass]
            preds = _host(predict(np.full(bgs.shape[0], i, np.int32), bgs))
            res.forward_passes += bgs.shape[0]
            res.tried[i] += bgs.shape[0]
            wrong = np.flatnonzero(preds != labels[i])
            if wrong.size:
                res.vulnerable[i] = True
                res.flip_background[i] = bgs[wrong[0]]
                res.flip_prediction[i] = preds[wrong[0]]
                break
    return res


# --------------------------------------------------------------------------------------------
# The model side: composites made and classified on device


def composite_predictor(
    model,
    mesh,
    images: np.ndarray,
    masks: np.ndarray,
    backgrounds: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    imagenet_to_in9: bool = False,
    apply_fn: Callable = apply_model,
) -> Predict:
    """`predict(fg_idx, bg_idx)` for a real model: composite = background * (1 - mask) +
    image * mask, made on device from pools held replicated on every device (uint8: IN-9's
    4,050 foregrounds + masks + backgrounds are ~1.4 GB), so a forward batch moves only two
    index vectors. Index batches divisible by the mesh size are sharded over it; others (the
    serial loop's single composites) run replicated. Predictions come back on every process.
    """
    if images.shape[:3] != masks.shape or images.shape[1:] != backgrounds.shape[1:]:
        raise ValueError(
            f"pools disagree: images {images.shape}, masks {masks.shape}, "
            f"backgrounds {backgrounds.shape}"
        )
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def put(array, sharding):
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    pools = tuple(put(a, replicated) for a in (images, masks, backgrounds))
    graphdef, state = nnx.split(model)
    table = jnp.asarray(metrics.IMAGENET_TO_IN9) if imagenet_to_in9 else None

    def step(state, pools, fg, bg):
        images, masks, backgrounds = pools
        mask = masks[fg]
        composite = jnp.where(mask[..., None] > 0, images[fg], backgrounds[bg])
        x = pipeline.normalize(composite, mean, std)
        logits = apply_fn(nnx.merge(graphdef, state), x, mask)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return pred if table is None else table[pred]

    jitted = jax.jit(
        step, out_shardings=replicated, compiler_options=xla_options.compiler_options()
    )

    def predict(fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
        sharding = batch_sharding if fg.shape[0] % mesh.size == 0 else replicated
        fg, bg = put(np.asarray(fg, np.int32), sharding), put(np.asarray(bg, np.int32), sharding)
        return jitted(state, pools, fg, bg)  # replicated; the search fetches it

    return predict


# --------------------------------------------------------------------------------------------
# Report


def summarize(
    result: SearchResult,
    labels: np.ndarray,
    original_pred: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """adversarial.json's numbers from a search."""
    n = labels.shape[0]
    misclassified = original_pred != labels
    per_class = {}
    for c, name in enumerate(class_names):
        rows = labels == c
        count = int(rows.sum())
        frac = float(result.vulnerable[rows].mean()) if count else None
        per_class[name] = {"vulnerable_fraction": frac, "count": count}
    fraction = float(result.vulnerable.mean())
    return dict(
        num_foregrounds=n,
        max_backgrounds=result.max_backgrounds,
        vulnerable=int(result.vulnerable.sum()),
        vulnerable_fraction=fraction,
        challenge_accuracy=1.0 - fraction,
        per_class=per_class,
        original_accuracy=float(1.0 - misclassified.mean()),
        misclassified_on_original=int(misclassified.sum()),
        misclassified_on_original_vulnerable=int((misclassified & result.vulnerable).sum()),
        forward_passes=int(result.forward_passes),
        padded_passes=int(result.padded_passes),
        exhaustive_passes=int(n * result.max_backgrounds),
        mean_backgrounds_tried=float(result.tried.mean()),
    )


def report_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# Adversarial backgrounds: {report.get('model')} (masking {report.get('masking')}), "
        f"step {report.get('step')}",
        "",
        f"{report['num_foregrounds']} foregrounds of `{report.get('dataset')}` "
        f"{report.get('split')}, each against up to {report['max_backgrounds']} ONLY_BG_T "
        f"backgrounds (order seed {report.get('seed')}).",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| vulnerable foregrounds | {report['vulnerable']} "
        f"({100 * report['vulnerable_fraction']:.2f}%) |",
        f"| challenge accuracy | {100 * report['challenge_accuracy']:.2f}% |",
        f"| accuracy on original | {100 * report['original_accuracy']:.2f}% |",
        f"| misclassified on original (of them vulnerable) | "
        f"{report['misclassified_on_original']} "
        f"({report['misclassified_on_original_vulnerable']}) |",
        f"| forward passes (images through the model) | {report['forward_passes']} |",
        f"| exhaustive search would take | {report['exhaustive_passes']} |",
        f"| padding rows | {report['padded_passes']} |",
        "",
        "| class | vulnerable (%) | foregrounds |",
        "|---|---:|---:|",
    ]
    for name, v in report["per_class"].items():
        frac = "—" if v["vulnerable_fraction"] is None else f"{100 * v['vulnerable_fraction']:.2f}"
        lines.append(f"| {name} | {frac} | {v['count']} |")
    return "\n".join(lines) + "\n"


def examples_figure(
    result: SearchResult,
    fg: Mapping[str, np.ndarray],
    backgrounds: np.ndarray,
    class_names: Sequence[str],
    out_path: str | os.PathLike,
    *,
    count: int = 8,
) -> str | None:
    """Rows of (foreground image, its first flipping background, the composite), labelled
    'true -> predicted'. None when nothing was flipped."""
    from bgjax import plots

    rows = []
    for i in np.flatnonzero(result.vulnerable)[:count]:
        bg = backgrounds[result.flip_background[i]]
        composite = np.where(fg["mask"][i][..., None] > 0, fg["image"][i], bg)
        true, pred = fg["label"][i], result.flip_prediction[i]
        label = f"{class_names[true]} → {class_names[pred] if pred >= 0 else 'unmapped'}"
        rows.append((label, {"image": fg["image"][i], "background": bg, "composite": composite}))
    return plots.variant_grid(rows, out_path) if rows else None


# --------------------------------------------------------------------------------------------
# The command


def analyze(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    max_backgrounds: int | None = None,
    max_foregrounds: int | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Search a workdir's checkpoint; writes adversarial.json/.md/.png to `out_dir` (default
    `workdir/eval/step_<N>`) and returns the report."""
    restored = workdir_lib.restore(workdir, step, overrides=overrides)
    config = restored.config
    if not restored.mask_source.is_gt:
        raise ValueError(
            "adversarial search composites with the ground-truth masks: mask_source must be 'gt'"
        )
    split = split or data_lib.default_split(config.data.name)
    source = data_lib.get_source(config.data, split)
    load = dict(
        image_size=config.data.image_size,
        seed=config.seed,
        eval_resize=pipeline.EvalResize.from_config(config.data),  # as `bgjax eval` scores
    )
    fg = pipeline.load_examples(source, "original", limit=max_foregrounds, **load)
    backgrounds = pipeline.load_examples(source, "only_bg_t", **load)["image"]
    mesh = restored.mesh
    batch_size = batch_size or config.eval.batch_size
    batch_size = -(-batch_size // mesh.size) * mesh.size
    predict = composite_predictor(
        restored.model, mesh, fg["image"], fg["mask"], backgrounds,
        mean=restored.mean, std=restored.std,
    )  # fmt: skip
    n = fg["label"].shape[0]
    graphdef, params, rest = nnx.split(restored.model, nnx.Param, ...)
    evaluator = classify.Evaluator(
        graphdef, mesh, num_classes=restored.info.num_classes, mean=restored.mean,
        std=restored.std, masked=config.model.get("masking", "none") != "none",
    )  # fmt: skip
    original_pred = evaluator.predict(
        params, rest, source, "original", batch_size=batch_size, **load
    )["pred"][:n]
    order = background_order(backgrounds.shape[0], seed, max_backgrounds)
    start = time.perf_counter()
    result = batched_search(predict, fg["label"], order, batch_size=batch_size)
    seconds = time.perf_counter() - start
    report = dict(restored.metadata(), split=split, seed=seed, batch_size=batch_size)
    report.update(summarize(result, fg["label"], original_pred, source.info.class_names))
    report["search_seconds"] = seconds
    out_dir = os.fspath(out_dir or restored.out_dir())
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "adversarial.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out_dir, "adversarial.md"), "w") as f:
            f.write(report_markdown(report))
        examples_figure(
            result, fg, backgrounds, source.info.class_names,
            os.path.join(out_dir, "adversarial.png"),
        )  # fmt: skip
    return report


_WORKDIR = clflags.string("workdir", None, "Training workdir.")
_STEP = clflags.checkpoint_step("step")
_MAX_BACKGROUNDS = clflags.integer("max_backgrounds", None, "Backgrounds per foreground (all).")
_MAX_FOREGROUNDS = clflags.integer("max_foregrounds", None, "Foregrounds searched (all).")
_SPLIT = clflags.string("split", None, "Split (default: test; in9: val).")
_BATCH_SIZE = clflags.integer("batch_size", None, "Composites per forward batch.")
_ORDER_SEED = clflags.integer("order_seed", 0, "Seed of the background order.")
_OUT = clflags.string("out", None, "Output folder (default WORKDIR/eval/step_<N>).")
flags_parser = config_utils.parse_flags_with_overrides  # --config.<key> of the saved run


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    parallel.initialize_distributed()
    try:
        report = analyze(
            _WORKDIR.value, _STEP.value, max_backgrounds=_MAX_BACKGROUNDS.value,
            max_foregrounds=_MAX_FOREGROUNDS.value, split=_SPLIT.value,
            batch_size=_BATCH_SIZE.value, seed=_ORDER_SEED.value,
            overrides=config_utils.override_flag_values(), out_dir=_OUT.value,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax adversarial: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report_markdown(report))
