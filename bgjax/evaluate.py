"""`bgjax eval`: score saved checkpoints on the background variants, without retraining.

    bgjax eval --workdir DIR [--step N | --all_steps] [--dataset NAME] [--variants all|a,b]
               [--split test] [--config.key=value ...]
    bgjax eval --pretrained convnext_tiny --weights FILE.safetensors --dataset in9 --out DIR

Per step it writes `DIR/eval/step_<N>/`: `results.json` (accuracy and count per variant, BG-gap,
label x habitat groups with worst-group and training-weighted average accuracy, the fg/bg bucket
table, per-class accuracy), `results.md` (the same as tables) and `variants.png`.

Every variant walks the same pipeline in index order, so row i of every variant is image i's
foreground (MIXED_RAND keeps the foreground, swaps the background), which is what aligns the
per-image predictions for the bucket table. The pipeline pads the last batch; padding rows carry
valid=False and are never counted. The jitted step is sharded over the mesh (batch on all axes,
parameters as the checkpoint placed them) and returns replicated predictions, so every process
holds all of them.

A 1000-class ImageNet model is scored on IN-9 by the reference rule: top-1 over the 1000 logits
mapped to IN-9, unmapped classes wrong (`metrics.IMAGENET_TO_IN9`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import clflags, metrics, parallel, variants, xla_options
from bgjax import data as data_lib
from bgjax import masks as masks_lib
from bgjax import run as run_lib
from bgjax.data import pipeline
from bgjax.models import segmenter as segmenter_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------
# Applying a model


def apply_model(model, x, mask):
    """Logits of `model` on normalised images; the mask goes in only if the model masks."""
    masked = getattr(model, "masking", "none") != "none"
    return model(x, mask if masked else None, train=False)


def make_predict_step(
    model,
    mesh,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    imagenet_to_in9: bool = False,
    apply_fn: Callable = apply_model,
    segmenter: masks_lib.MaskSource | None = None,
) -> Callable[[Mapping[str, jax.Array]], dict[str, np.ndarray]]:
    """A jitted `step(global_batch) -> dict` of per-row `pred`, `label`, `habitat`, `valid`
    (replicated device arrays: fetch with `parallel.fetch`).

    `segmenter` (a `bgjax.masks` source, config.mask_source) predicts the masks in place of the
    batch's ground truth, inside the step, as in training. Outputs are replicated so every
    process can read all rows.
    """
    graphdef, state = nnx.split(model)
    table = jnp.asarray(metrics.IMAGENET_TO_IN9) if imagenet_to_in9 else None
    mask_params = None if segmenter is None else segmenter.params

    def step(state, batch, mask_params):
        model = nnx.merge(graphdef, state)
        images = pipeline.normalize(batch["image"], mean, std)
        masks = run_lib.masks_for_batch(batch, images, segmenter, mask_params)
        logits = apply_fn(model, images, masks)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if table is not None:
            if logits.shape[-1] != table.shape[0]:
                raise ValueError(f"IN-1000 -> IN-9 mapping needs 1000 logits, got {logits.shape}")
            pred = table[pred]
        return dict(pred=pred, label=batch["label"], habitat=batch["habitat"], valid=batch["valid"])

    jitted = jax.jit(
        step,
        out_shardings=parallel.replicated(mesh),
        compiler_options=xla_options.compiler_options(),
    )
    return lambda batch: jitted(state, batch, mask_params)


def predict_variant(
    step: Callable, source, variant: str, *, batch_size: int, image_size: int, seed: int, mesh
) -> dict[str, np.ndarray]:
    """Per-image `pred`, `label`, `habitat` of `variant`, valid rows only, in example order
    (on several processes too), so row i of every variant is example i's foreground."""
    ds = pipeline.build(
        source,
        variant=variant,
        batch_size=batch_size,
        image_size=image_size,
        train=False,
        seed=seed,
        num_devices=mesh.size,
    )
    # Dispatch every batch before fetching any result, so the device never waits on the host.
    rows = parallel.fetch([step(pipeline.to_global(batch, mesh)) for batch in ds])
    out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    valid = out.pop("valid").astype(bool)
    order = np.argsort(_example_index(len(rows), batch_size, jax.process_count())[valid])
    return {k: v[valid][order] for k, v in out.items()}


def _example_index(num_batches: int, batch_size: int, process_count: int) -> np.ndarray:
    """Example index of every global row: global batch k is the processes' local batches in
    process order, and process p holds examples p, p + P, p + 2P, ... (`pipeline._shard`).
    Padding rows get indices past the end; they are dropped by `valid` anyway."""
    local = batch_size // process_count
    k, p, j = np.meshgrid(
        np.arange(num_batches), np.arange(process_count), np.arange(local), indexing="ij"
    )
    return (p + process_count * (k * local + j)).reshape(-1)


# --------------------------------------------------------------------------------------------
# Results


def summarize(predictions: Mapping[str, Mapping[str, np.ndarray]], info) -> dict[str, Any]:
    """results.json's metrics from per-variant predictions (`predict_variant` outputs)."""
    results: dict[str, Any] = {"variants": {}}
    for name, p in predictions.items():
        results["variants"][name] = metrics.accuracy(p["pred"], p["label"])
    accs = {k: v["accuracy"] for k, v in results["variants"].items()}
    results["bg_gap"] = metrics.bg_gap(accs)

    results["groups"] = results["worst_group_accuracy"] = results["average_accuracy"] = None
    original = predictions.get("original")
    group_names = info.group_names()
    if original is not None and group_names is not None:
        groups = metrics.group_accuracies(
            original["pred"], original["label"], original["habitat"], group_names,
            info.num_habitats,
        )  # fmt: skip
        results["groups"] = groups
        results["worst_group_accuracy"] = metrics.worst_group_accuracy(groups)
        if info.train_group_proportions is not None:
            results["average_accuracy"] = metrics.weighted_average_accuracy(
                groups, info.train_group_proportions
            )
    results["per_class"] = None
    if original is not None:
        results["per_class"] = metrics.per_class_accuracies(
            original["pred"], original["label"], info.class_names
        )
    results["buckets"] = None
    if {"original", "mixed_rand", "only_bg_t"} <= set(predictions):
        hits = {
            k: metrics.correct(predictions[k]["pred"], predictions[k]["label"])
            for k in ("original", "mixed_rand", "only_bg_t")
        }
        results["buckets"] = metrics.four_buckets(
            hits["original"], hits["mixed_rand"], hits["only_bg_t"]
        )
    return results


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.json as Markdown tables."""
    head = (
        f"# Evaluation: {results.get('model', '?')} (masking {results.get('masking', '?')}), "
        f"step {results.get('step')}\n\n"
        f"dataset `{results.get('dataset')}` split `{results.get('split')}`, "
        f"mask source `{results.get('mask_source')}`\n"
    )
    if results.get("task") == masks_lib.SEGMENT_TASK:
        parts = [head, "| variant | fg IoU (%) | bg IoU (%) | mIoU (%) | pixel accuracy (%) |"]
        parts.append("|---|---:|---:|---:|---:|")
        for name, v in results["variants"].items():
            cells = " | ".join(_pct(v[m]) for m in segmenter_lib.METRICS)
            parts.append(f"| {name} | {cells} |")
        return "\n".join(parts) + "\n"
    parts = [head, "| variant | accuracy (%) | images |", "|---|---:|---:|"]
    for name, v in results["variants"].items():
        parts.append(f"| {name} | {_pct(v['accuracy'])} | {v['count']} |")
    if results.get("gt_masks"):
        gt = results["gt_masks"]["variants"]
        parts += ["", "| variant | accuracy, predicted masks (%) | with ground-truth masks (%) |"]
        parts.append("|---|---:|---:|")
        for name, v in results["variants"].items():
            parts.append(f"| {name} | {_pct(v['accuracy'])} | {_pct(gt[name]['accuracy'])} |")
    summary = {
        "BG-gap (mixed_same − mixed_rand)": results.get("bg_gap"),
        "worst-group accuracy": results.get("worst_group_accuracy"),
        "average accuracy (train-weighted)": results.get("average_accuracy"),
    }
    lines = [f"| {k} | {_pct(v)} |" for k, v in summary.items() if v is not None]
    if lines:
        parts += ["", "| metric | % |", "|---|---:|", *lines]
    for title, table in (("group", results.get("groups")), ("class", results.get("per_class"))):
        if table:
            parts += ["", f"| {title} (original) | accuracy (%) | images |", "|---|---:|---:|"]
            parts += [f"| {k} | {_pct(v['accuracy'])} | {v['count']} |" for k, v in table.items()]
    if results.get("buckets"):
        parts += [
            "",
            "Foreground (MIXED_RAND) vs background (ONLY_BG_T) correctness:",
            "",
            "| bucket | images | share (%) | original accuracy (%) |",
            "|---|---:|---:|---:|",
        ]
        for k, v in results["buckets"].items():
            row = f"| {k} | {v['count']} | {_pct(v['fraction'])} | {_pct(v['original_accuracy'])} |"
            parts.append(row)
    return "\n".join(parts) + "\n"


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """results.json + results.md + variants.png in `out_dir` (main process only)."""
    from bgjax import plots

    out_dir = os.fspath(out_dir)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("json", "results.json"), ("md", "results.md"), ("png", "variants.png"))}  # fmt: skip
    if not parallel.is_main_process():
        return paths
    os.makedirs(out_dir, exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(results_markdown(results))
    title = f"{results.get('model', '')} {results.get('masking', '')} step {results.get('step')}"
    if results.get("task") == masks_lib.SEGMENT_TASK:
        ious = {k: v["fg_iou"] for k, v in results["variants"].items()}
        plots.variant_accuracy_bars({title.strip(): ious}, paths["png"], ylabel="fg IoU (%)")
        return paths
    series = {title.strip(): {k: v["accuracy"] for k, v in results["variants"].items()}}
    if results.get("gt_masks"):
        series["ground-truth masks"] = {
            k: v["accuracy"] for k, v in results["gt_masks"]["variants"].items()
        }
    chance = 1 / results["num_classes"] if results.get("num_classes") else None
    plots.variant_accuracy_bars(series, paths["png"], chance=chance)
    return paths


# --------------------------------------------------------------------------------------------
# Workdirs, steps, variants and config overrides


def available_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps of a training workdir, ascending."""
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"no checkpoint in {workdir}: {ckpt_dir} does not exist (is it a training workdir?)"
        )
    steps = sorted(
        int(p.name)
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and p.is_dir() and checkpoint_lib.is_finalized(p)
    )
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    return steps


def resolve_steps(workdir, step: int | None = None, all_steps: bool = False) -> list[int]:
    """[step] after checking it exists, every step, or [latest]."""
    steps = available_steps(workdir)
    if all_steps:
        return steps
    if step is None:
        return [steps[-1]]
    if step not in steps:
        raise ValueError(
            f"checkpoint step {step} does not exist in {epath.Path(workdir) / 'checkpoints'}; "
            f"available steps: {', '.join(map(str, steps))}"
        )
    return [step]


def parse_variants(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'all' / None -> every variant; 'a,b' or [a, b] -> those, checked against VARIANTS."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or ["all"])
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return variants.VARIANTS
    unknown = [n for n in names if n not in variants.VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}; valid: all, {', '.join(variants.VARIANTS)}"
        )
    return tuple(dict.fromkeys(names))


def _literal(text: Any) -> Any:
    """'128' -> 128, "('a','b')" -> tuple, 'in9' -> 'in9' (not a Python literal: kept as text)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *, allow_new: bool = False
) -> ml_collections.ConfigDict:
    """A copy of `config` with `{"data.image_size": "128", ...}` applied (values parsed as
    Python literals when they are). Unknown keys are errors unless `allow_new`; `model.*` keys
    are refused: the checkpoint fixes the architecture."""
    config = ml_collections.ConfigDict(config.to_dict())
    for path, value in overrides.items():
        if path.split(".")[0] == "model":
            raise ValueError(
                f"--config.{path}: model keys cannot be overridden at evaluation, the "
                "checkpoint fixes the architecture"
            )
        *parents, leaf = path.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node and allow_new:
                node[part] = ml_collections.ConfigDict()
            where = ".".join(parents[:depth]) or "<top level>"
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {path!r}: {where} has no group {part!r}")
            node = node[part]
        if leaf not in node and not allow_new:
            where = ".".join(parents) or "<top level>"
            raise ValueError(
                f"unknown config key {path!r}; keys of {where}: {', '.join(sorted(node.keys()))}"
            )
        try:
            node[leaf] = _literal(value)
        except TypeError as e:
            raise ValueError(f"--config.{path}={value!r}: {e}") from None
    return config


_OVERRIDE_FLAG = re.compile(r"^--?config\.([A-Za-z_][\w.]*)(?:=|$)")


def define_override_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define a string flag `config.<key>` for each `--config.<key>=value` in `argv`.

    The keys are only known from the workdir's config.json, read after flag parsing, so each
    override is taken as text here and checked and typed by `apply_overrides`. (Eval takes no
    config file; where `bgjax.train` is imported too, its `--config` file flag stays unset.)
    """
    for arg in argv:
        match = _OVERRIDE_FLAG.match(arg)
        if match and f"config.{match[1]}" not in flag_values:
            flags.DEFINE_string(
                f"config.{match[1]}", None, "override of the saved config", flag_values=flag_values
            )


def override_flag_values(fv: flags.FlagValues = flags.FLAGS) -> dict[str, str]:
    """{key: text} of the `--config.<key>` overrides given on the command line."""
    return {
        name[len("config.") :]: fv[name].value
        for name in fv
        if name.startswith("config.") and fv[name].present and isinstance(fv[name].value, str)
    }


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def default_split(dataset: str) -> str:
    """IN-9 has only the released 'val' split; the others evaluate on 'test'."""
    return "val" if dataset == "in9" else "test"


@dataclasses.dataclass
class Restored:
    """A trained model from a workdir, with everything needed to feed it like the trainer."""

    workdir: str
    step: int
    model: Any
    config: ml_collections.ConfigDict  # the saved config with the overrides applied
    mesh: jax.sharding.Mesh
    mean: tuple[float, ...]  # the normalisation it was trained with
    std: tuple[float, ...]
    segmenter: masks_lib.MaskSource | None  # None: the batch's ground-truth masks

    def metadata(self) -> dict[str, Any]:
        c = self.config
        return dict(
            step=self.step,
            dataset=c.data.name,
            workdir=self.workdir,
            model=c.model.name,
            masking=c.model.get("masking", "none"),
            mask_source=c.get("mask_source", "gt"),
            mask_source_kind="ground_truth" if self.segmenter is None else "segmenter",
            task=c.get("task", "classify"),
            train_variant=c.get("train_variant"),
        )

    def out_dir(self) -> str:
        return os.path.join(self.workdir, "eval", f"step_{self.step}")


def saved_config(
    workdir: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> ml_collections.ConfigDict:
    """A workdir's config.json with the `--config.*` overrides and `--dataset` applied."""
    config = apply_overrides(read_config(workdir), overrides or {})
    if dataset:
        config.data.name = dataset
    return config


def restore(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> Restored:
    """Checkpoint `step` (latest if None; a missing one lists the available steps) of a
    training workdir, on the mesh of its config (after `--config.*` overrides)."""
    (step,) = resolve_steps(workdir, step)
    config = saved_config(workdir, overrides=overrides, dataset=dataset)
    mesh = parallel.make_mesh(config.mesh)
    model, _, info = run_lib.restore_model(
        os.fspath(workdir), step, mesh=mesh, use_ema=config.eval.get("use_ema", False)
    )
    return Restored(
        workdir=os.fspath(workdir),
        step=step,
        model=model,
        config=config,
        mesh=mesh,
        mean=tuple(info.mean),
        std=tuple(info.std),
        segmenter=None
        if run_lib.is_segmenter(config)
        else run_lib.load_mask_source(
            config.get("mask_source", "gt"),
            image_size=config.data.image_size,
            mean=info.mean,
            std=info.std,
            mesh=mesh,
        ),
    )


def load_examples(
    source, variant: str, *, image_size: int, seed: int, limit: int | None = None
) -> dict[str, np.ndarray]:
    """`image`, `mask`, `label`, `habitat` of the first `limit` (default all) examples of
    `variant`, in index order, on every process (for analyses that need the whole set)."""
    limit = len(source) if limit is None else min(limit, len(source))
    batch = min(256, limit)
    ds = pipeline.build(
        source, variant=variant, batch_size=batch, image_size=image_size, train=False,
        seed=seed, process_index=0, process_count=1,
    )  # fmt: skip
    rows, have = [], 0
    for b in ds:
        rows.append({k: v[b["valid"]] for k, v in b.items() if k != "valid"})
        have += int(b["valid"].sum())
        if have >= limit:
            break
    return {k: np.concatenate([r[k] for r in rows])[:limit] for k in rows[0]}


# --------------------------------------------------------------------------------------------
# Evaluating a model


def _head_mode(model_classes: int, info) -> bool:
    """Whether predictions go through the IN-1000 -> IN-9 mapping (and a clear error if the
    model's classes cannot be scored on the dataset)."""
    if model_classes == info.num_classes:
        return False
    if model_classes == 1000 and info.num_classes == len(metrics.IN9_CLASSES):
        return True
    raise ValueError(
        f"a {model_classes}-class model cannot be scored on {info.name!r} "
        f"({info.num_classes} classes); only 1000-class ImageNet models map onto IN-9"
    )


def score(
    model,
    source,
    *,
    variant_names: Sequence[str],
    mesh,
    batch_size: int,
    image_size: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    segmenter: masks_lib.MaskSource | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on every variant of `source`: `summarize`'s metrics plus metadata."""
    imagenet = _head_mode(model.num_classes, source.info)
    batch_size = -(-batch_size // mesh.size) * mesh.size  # rounded up: never a dropped example
    step = make_predict_step(
        model, mesh, mean=mean, std=std, imagenet_to_in9=imagenet, segmenter=segmenter
    )
    predictions = {}
    for name in variant_names:
        logging.info("evaluating %s on %s", name, source.info.name)
        predictions[name] = predict_variant(
            step, source, name, batch_size=batch_size, image_size=image_size, seed=seed, mesh=mesh
        )
    results = summarize(predictions, source.info)
    results.update(
        num_examples=len(source),
        num_classes=source.info.num_classes,
        image_size=image_size,
        imagenet_to_in9=imagenet,
        variant_seed=seed,
    )
    return results


def score_segmenter(
    model,
    source,
    config: ml_collections.ConfigDict,
    *,
    variant_names: Sequence[str],
    mesh,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """A segmenter's foreground / background IoU, their mean and pixel accuracy per variant,
    over the variants whose mask is the visible foreground (`masks.SEGMENTATION_VARIANTS`);
    the trainer's own evaluation loop, so the numbers match its eval/<variant>/* metrics."""
    names = [v for v in variant_names if v in masks_lib.SEGMENTATION_VARIANTS]
    if not names:
        raise ValueError(
            f"a segmenter is scored only on variants whose mask is the visible foreground "
            f"{masks_lib.SEGMENTATION_VARIANTS}; got {tuple(variant_names)}"
        )
    config = copy.deepcopy(config)
    config.eval.variants = tuple(names)
    config.eval.batch_size = -(-batch_size // mesh.size) * mesh.size  # never a dropped example
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    info = dataclasses.replace(source.info, mean=tuple(mean), std=tuple(std))
    step = jax.jit(
        run_lib.make_eval_step(config, graphdef, info),
        out_shardings=parallel.replicated(mesh),
        compiler_options=xla_options.compiler_options(),
    )
    flat = run_lib.evaluate(step, params, rest, None, source, config, mesh)
    per_variant = {v: {m: flat[f"eval/{v}/{m}"] for m in segmenter_lib.METRICS} for v in names}
    return dict(
        task=masks_lib.SEGMENT_TASK,
        variants=per_variant,
        **per_variant.get("original", {}),  # the headline numbers
        skipped_variants=[v for v in variant_names if v not in names],
        num_examples=len(source),
        image_size=config.data.image_size,
        variant_seed=config.seed,
    )


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    variant_names: Sequence[str] = variants.VARIANTS,
    split: str | None = None,
    dataset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Restore `workdir`'s checkpoint `step` (latest if None), evaluate and write the results
    to `out_dir` (default `workdir/eval/step_<N>`). Returns results.json's content.

    A segmenter workdir (config.task="segment") is scored by IoU (`score_segmenter`). A
    classifier whose masks come from a segmenter (config.mask_source) is also scored with the
    ground-truth masks, under `gt_masks`, for comparison (when the dataset has masks). A run
    that needs masks the dataset lacks is refused first (`run.require_masks`)."""
    config = saved_config(workdir, overrides=overrides, dataset=dataset)
    segment = run_lib.is_segmenter(config)
    # A segmenter may train on one dataset and evaluate on another (e.g. IN-9L train, IN-9 eval).
    data_config = (config.eval.get("data") or config.data) if segment else config.data
    split = split or default_split(data_config.name)
    source = data_lib.get_source(data_config, split)
    run_lib.require_masks(source, variant_names, config, command="bgjax eval")  # before restoring
    run = restore(workdir, step, overrides=overrides, dataset=dataset)
    batch_size = batch_size or config.eval.batch_size
    results = dict(run.metadata(), split=split)
    if segment:
        results.update(
            score_segmenter(
                run.model,
                source,
                config,
                variant_names=variant_names,
                mesh=run.mesh,
                batch_size=batch_size,
                mean=run.mean,
                std=run.std,
            )  # fmt: skip
        )
    else:
        scorer = functools.partial(
            score,
            run.model,
            source,
            variant_names=variant_names,
            mesh=run.mesh,
            batch_size=batch_size,
            image_size=config.data.image_size,
            seed=config.seed,  # the trainer's eval seed: the same mixed partners
            mean=run.mean,
            std=run.std,
        )
        results.update(scorer(segmenter=run.segmenter))
        with_gt = getattr(source, "has_masks", True) and results["masking"] != "none"
        if run.segmenter is not None and with_gt:
            gt = scorer(segmenter=None)
            results["gt_masks"] = {k: gt[k] for k in ("variants", "bg_gap")}
    write_results(results, out_dir or run.out_dir())
    return results


def evaluate_pretrained(
    name: str,
    weights: str | os.PathLike,
    dataset: str,
    *,
    out_dir: str | os.PathLike,
    variant_names: Sequence[str] = variants.VARIANTS,
    split: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    image_size: int = 224,
) -> dict[str, Any]:
    """An imported timm model (`models.from_timm`), ImageNet normalisation, no workdir."""
    from bgjax import models

    base = ml_collections.ConfigDict(
        dict(seed=0, mesh=[("data", -1)], data=dict(name=dataset, image_size=image_size))
    )
    config = apply_overrides(base, overrides or {}, allow_new=True)
    split = split or default_split(config.data.name)
    mesh = parallel.make_mesh(config.mesh)
    source = data_lib.get_source(config.data, split)
    run_lib.require_masks(source, variant_names, None, command="bgjax eval")
    model = models.from_timm(name, os.fspath(weights))
    results = dict(
        step=0,
        dataset=config.data.name,
        split=split,
        pretrained=name,
        weights=os.fspath(weights),
        model=name,
        masking="none",
        mask_source="gt",
        train_variant=None,
    )
    results.update(
        score(
            model,
            source,
            variant_names=variant_names,
            mesh=mesh,
            batch_size=batch_size,
            image_size=config.data.image_size,
            seed=config.seed,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    )
    write_results(results, out_dir)
    return results


# --------------------------------------------------------------------------------------------
# Command line

_WORKDIR = clflags.string("workdir", None, "Training workdir to evaluate.")
_STEP = clflags.integer("step", None, "Checkpoint step (default: the latest).")
_ALL_STEPS = clflags.boolean("all_steps", False, "Evaluate every saved checkpoint step.")
_DATASET = clflags.string("dataset", None, "Dataset name (default: the training config's).")
_VARIANTS = clflags.string("variants", "all", "'all' or a comma-separated list of variants.")
_SPLIT = clflags.string("split", None, "Split to evaluate (default: test; in9: val).")
_BATCH_SIZE = clflags.integer("batch_size", None, "Global eval batch (default config.eval's).")
_OUT = clflags.string("out", None, "Output folder (default WORKDIR/eval/step_<N>).")
_PRETRAINED = clflags.string("pretrained", None, "timm model name of an imported model.")
_WEIGHTS = clflags.string("weights", None, "timm weights (.safetensors/.pth) for --pretrained.")
define_override_flags(sys.argv)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed()
    try:
        names = parse_variants(_VARIANTS.value)
        overrides = override_flag_values()
        if _PRETRAINED.value:
            if not (_WEIGHTS.value and _DATASET.value and _OUT.value):
                raise app.UsageError("--pretrained needs --weights, --dataset and --out")
            results = evaluate_pretrained(
                _PRETRAINED.value, _WEIGHTS.value, _DATASET.value, out_dir=_OUT.value,
                variant_names=names, split=_SPLIT.value, overrides=overrides,
                batch_size=_BATCH_SIZE.value or 64,
            )  # fmt: skip
            print(results_markdown(results))
            return
        if not _WORKDIR.value:
            raise app.UsageError("--workdir (or --pretrained) is required")
        for step in resolve_steps(_WORKDIR.value, _STEP.value, _ALL_STEPS.value):
            out = os.path.join(_OUT.value, f"step_{step}") if _OUT.value else None
            results = evaluate_checkpoint(
                _WORKDIR.value, step, variant_names=names, split=_SPLIT.value,
                dataset=_DATASET.value, overrides=overrides, batch_size=_BATCH_SIZE.value,
                out_dir=out,
            )  # fmt: skip
            print(results_markdown(results))
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax eval: error: {e}", file=sys.stderr)
        sys.exit(2)
