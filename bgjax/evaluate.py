"""`bgjax eval`: score saved checkpoints on the background variants, without retraining.

    bgjax eval --workdir DIR [--step N | --all_steps] [--dataset NAME] [--variants all|a,b]
               [--split test] [--config.key=value ...]
    bgjax eval --pretrained convnext_tiny --weights FILE.safetensors --dataset in9 --out DIR

Per step it writes `DIR/eval/step_<N>/`: `results.json`, `results.md` and `variants.png`. What
is computed is the task's (`bgjax.tasks`): for a classifier, accuracy and count per variant,
BG-gap, label x habitat groups with worst-group and training-weighted average accuracy, the
fg/bg bucket table and per-class accuracy; for a segmenter, IoU per variant. The run is read
through `bgjax.workdir`. This module is the command only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app
from flax import nnx

from bgjax import clflags, config_utils, parallel, tasks, variants
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.tasks import classify


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    step: int | str | None = None,
    *,
    variant_names: Sequence[str] = variants.VARIANTS,
    split: str | None = None,
    dataset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Restore `workdir`'s checkpoint `step` (latest if None), evaluate and write the results
    to `out_dir` (default `workdir/eval/step_<N>`). Returns results.json's content. A run that
    needs masks the dataset lacks is refused before anything is restored."""
    config = workdir_lib.saved_config(workdir, overrides=overrides, dataset=dataset)
    data_config = tasks.get(config).eval_data(config)
    split = split or data_lib.default_split(data_config.name)
    source = data_lib.get_source(data_config, split)
    tasks.require_masks(source, variant_names, config, command="bgjax eval")
    run = workdir_lib.restore(workdir, step, overrides=overrides, dataset=dataset)
    results = dict(run.metadata(), split=split)
    results.update(
        tasks.score(
            run,
            source,
            variant_names,
            batch_size=batch_size or config.eval.batch_size,
            image_size=config.data.image_size,
        )  # fmt: skip
    )
    tasks.write_results(results, out_dir or run.out_dir())
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
    config = config_utils.apply_overrides(base, overrides or {}, allow_new=True)
    split = split or data_lib.default_split(config.data.name)
    mesh = parallel.make_mesh(config.mesh)
    source = data_lib.get_source(config.data, split)
    tasks.require_masks(source, variant_names, None, command="bgjax eval")
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
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    evaluator = classify.Evaluator(
        graphdef, mesh, num_classes=model.num_classes, mean=data_lib.IMAGENET_MEAN,
        std=data_lib.IMAGENET_STD, masked=getattr(model, "masking", "none") != "none",
    )  # fmt: skip
    results.update(
        evaluator(
            params,
            rest,
            source,
            variant_names,
            batch_size=batch_size,
            image_size=config.data.image_size,
            seed=config.seed,
        )  # fmt: skip
    )
    tasks.write_results(results, out_dir)
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
# `--config.<key>=value` overrides of the saved config (its keys are known only from the
# workdir): defined from argv by the parser bgjax.cli calls.
flags_parser = config_utils.parse_flags_with_overrides


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed()
    try:
        names = variants.parse(_VARIANTS.value)
        overrides = config_utils.override_flag_values()
        if _PRETRAINED.value:
            if not (_WEIGHTS.value and _DATASET.value and _OUT.value):
                raise app.UsageError("--pretrained needs --weights, --dataset and --out")
            results = evaluate_pretrained(
                _PRETRAINED.value, _WEIGHTS.value, _DATASET.value, out_dir=_OUT.value,
                variant_names=names, split=_SPLIT.value, overrides=overrides,
                batch_size=_BATCH_SIZE.value or 64,
            )  # fmt: skip
            print(tasks.results_markdown(results))
            return
        if not _WORKDIR.value:
            raise app.UsageError("--workdir (or --pretrained) is required")
        for step in workdir_lib.resolve_steps(_WORKDIR.value, _STEP.value, _ALL_STEPS.value):
            out = os.path.join(_OUT.value, f"step_{step}") if _OUT.value else None
            results = evaluate_checkpoint(
                _WORKDIR.value, step, variant_names=names, split=_SPLIT.value,
                dataset=_DATASET.value, overrides=overrides, batch_size=_BATCH_SIZE.value,
                out_dir=out,
            )  # fmt: skip
            print(tasks.results_markdown(results))
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser)
