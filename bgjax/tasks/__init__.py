"""Tasks: what a run learns and how it is scored. `config.task` picks one:

    classify   (default) the class of the foreground; accuracy per background variant,
               BG-gap, groups, the fg/bg buckets (`classify.py`)
    segment    the foreground mask itself, the segmenter whose workdir serves as another run's
               `config.mask_source`; IoU per variant (`segment.py`)

Each task module has the same parts: `create` (its model), `check_config`, `targets` / `loss` /
`accuracy` (the train step), `load_init_weights`, one `Evaluator` (used by the trainer's periodic
evaluation and by `bgjax eval` alike), `log_metrics` / `metric_names` (what the trainer logs) and
`markdown` / `plot` (the results files).
Nothing outside this package branches on the task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from flax import nnx

from bgjax import parallel
from bgjax.masks import GT
from bgjax.models import cpu_kernels
from bgjax.tasks import classify, records, segment

TASKS = {module.NAME: module for module in (classify, segment)}
# config.model keys the trainer consumes; every other key goes to the model constructor.
_TRAINER_MODEL_KEYS = ("name", "frozen_backbone", "init", "dtype", "attention")


def get(config: ml_collections.ConfigDict | Mapping[str, Any] | str):
    """The task module of a config (its `task` key, default "classify") or of a task name."""
    name = config if isinstance(config, str) else config.get("task", classify.NAME)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {tuple(TASKS)}")
    return TASKS[name]


def make_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """`config.model` -> the task's model. Early masking fills with black in the dataset's
    normalisation (`pixel_mean` / `pixel_std`)."""
    mcfg = config.model
    overrides = {k: v for k, v in mcfg.items() if k not in _TRAINER_MODEL_KEYS}
    overrides["dtype"] = cpu_kernels.resolve_dtype(mcfg.get("dtype", "float32"))
    attention = mcfg.get("attention", "auto")
    if mcfg.name.startswith("vit_"):  # the only family with attention layers
        overrides.setdefault("attn_impl", attention)
    elif attention != "auto":
        raise ValueError(f"model.attention={attention!r}: {mcfg.name} has no attention layers")
    if pixel_mean is not None:
        overrides.setdefault("pixel_mean", tuple(pixel_mean))
        overrides.setdefault("pixel_std", tuple(pixel_std))
    rngs = rngs or nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    return get(config).create(mcfg.name, num_classes, rngs=rngs, **overrides)


def require_masks(
    source,
    variants: Sequence[str],
    config: ml_collections.ConfigDict | None,
    *,
    command: str,
    released: Sequence[str] = (),
) -> None:
    """ValueError, before anything is built or compiled, when `command` (e.g. "bgjax train")
    needs foreground masks that `source` does not have (`source.has_masks` False, e.g. the
    Waterbirds release without data.cub_root, whose masks would be all ones): a masking model
    fed the dataset's masks (mask_source "gt"), a task whose targets are the masks, or a
    background variant other than "original" (composited from the mask and box) that is not
    read from `released` files (the IN-9 release's folders, at evaluation)."""
    if getattr(source, "has_masks", True):
        return
    needs, remedies = [], [getattr(source, "masks_hint", None) or "use a source that has them"]
    masking = "none" if config is None else config.get("model", {}).get("masking", "none")
    mask_source = GT if config is None else config.get("mask_source", GT)
    if config is not None and get(config).MASKS_ARE_TARGETS:
        needs.append(f"task={get(config).NAME!r} (the masks are its targets)")
    elif masking != "none" and mask_source == GT:
        needs.append(f"model.masking={masking!r} with mask_source='gt'")
        remedies.append("or, for masking, set config.mask_source to a trained segmenter workdir")
    composited = [v for v in variants if v != "original" and v not in released]
    if composited:
        needs.append(f"the variants {', '.join(composited)} (only 'original' needs no masks)")
    if needs:
        info = source.info
        raise ValueError(
            f"{command}: dataset {info.name!r} ({info.split} split) has no foreground masks, "
            f"but this run needs them for {'; '.join(needs)}. Provide them: "
            f"{'; '.join(remedies)}."
        )


def check_label_space(config, train_info, eval_info, *, by_index: bool = False) -> None:
    """ValueError when a run trained on `train_info`'s classes cannot be scored on
    `eval_info`'s (the task's rule; a task without classes has none)."""
    check = getattr(get(config), "check_label_space", None)
    if check is not None:
        check(train_info, eval_info, by_index=by_index)


def check_best_metric(config: ml_collections.ConfigDict, eval_info) -> None:
    """ValueError, before training, when `config.checkpoint.best_metric` is not a metric the
    periodic evaluation of `eval_info`'s dataset logs (e.g. a group metric without groups)."""
    name = config.checkpoint.get("best_metric")
    if not name:
        return
    known = get(config).metric_names(eval_info, tuple(config.eval.variants))
    if name not in known:
        raise ValueError(
            f"checkpoint.best_metric {name!r} is not logged by this run's evaluation (dataset "
            f"{eval_info.name!r}, {eval_info.split} split, variants {list(config.eval.variants)}"
            f"); it logs: {', '.join(known[:16])}{' ...' if len(known) > 16 else ''}"
        )


def score(
    run,
    source,
    variant_names: Sequence[str],
    *,
    batch_size: int,
    image_size: int,
    with_gt_masks: bool = True,
    eval_resize=None,
) -> dict[str, Any]:
    """The task's evaluation of a restored run (`bgjax.workdir.Restored`) on `source`, by the
    evaluator the trainer uses. A
    classifier whose masks come from a segmenter is also scored with the ground-truth masks,
    under `gt_masks`, when `with_gt_masks` and the dataset has them. `eval_resize`: the
    `pipeline.EvalResize` that brings images to image_size (None: warp)."""
    task = get(run.config)
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    masked = run.config.model.get("masking", "none") != "none"
    kwargs = dict(
        batch_size=batch_size, image_size=image_size, seed=run.config.seed, eval_resize=eval_resize
    )

    def evaluate(mask_source, **extra):
        evaluator = task.Evaluator(
            graphdef, run.mesh, num_classes=run.info.num_classes, mean=run.mean, std=run.std,
            masked=masked, mask_source=mask_source,
        )  # fmt: skip
        return evaluator(params, rest, source, variant_names, **kwargs, **extra)

    results = evaluate(run.mask_source, **getattr(task, "SCORE_OPTIONS", {}))
    with_gt_masks = with_gt_masks and getattr(source, "has_masks", True)
    if with_gt_masks and masked and not run.mask_source.is_gt:
        gt = evaluate(None)
        results["gt_masks"] = {k: gt[k] for k in ("variants", "bg_gap")}
    return results


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.json as Markdown: a header naming the run, then the task's tables."""
    head = (
        f"# Evaluation: {results.get('model', '?')} (masking {results.get('masking', '?')}), "
        f"step {results.get('step')}\n\n"
        f"dataset `{results.get('dataset')}` split `{results.get('split')}`, "
        f"mask source `{results.get('mask_source')}`\n"
    )
    norm, resize = results.get("normalization"), results.get("eval_resize")
    if norm:
        head += f"normalisation mean {norm['mean']} std {norm['std']} ({norm['from']})\n"
    if resize:
        head += f"image size {results.get('image_size')} px by `{resize['rule']}`\n"
    if results.get("variant_sources"):
        sources = ", ".join(f"{k}: {v}" for k, v in results["variant_sources"].items())
        head += f"variant images: {sources}\n"
    return "\n".join([head, *get(results.get("task") or classify.NAME).markdown(results)]) + "\n"


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """results.json + results.md + variants.png in `out_dir` (main process only), and the
    per-example rows of `results["records"]` (taken out of results) as `records.parquet`/.csv."""
    out_dir = os.fspath(out_dir)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("json", "results.json"), ("md", "results.md"), ("png", "variants.png"))}  # fmt: skip
    rows = results.pop("records", None) if isinstance(results, dict) else None
    if not parallel.is_main_process():
        return paths
    os.makedirs(out_dir, exist_ok=True)
    if rows is not None:
        paths["records"] = records.write(rows, out_dir)
        results["records_file"] = os.path.basename(paths["records"])
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(results_markdown(results))
    title = f"{results.get('model', '')} {results.get('masking', '')} step {results.get('step')}"
    get(results.get("task") or classify.NAME).plot(results, paths["png"], title.strip())
    return paths
