"""`bgjax eval`: score saved checkpoints on the background variants, without retraining.

    bgjax eval --workdir DIR [--step N | --all_steps] [--dataset NAME] [--variants all|a,b]
               [--split test] [--config.key=value ...]
    bgjax eval --pretrained convnext_tiny --weights FILE.safetensors --dataset in9 --out DIR
    bgjax eval --pretrained efficientnet_b0 --weights FILE.safetensors --dataset in9 --out DIR

Per step it writes `DIR/eval/step_<N>/`: `results.json`, `results.md` and `variants.png`. What
is computed is the task's (`bgjax.tasks`): for a classifier, accuracy and count per variant,
BG-gap, label x habitat groups with worst-group and training-weighted average accuracy, the
fg/bg bucket table and per-class accuracy; for a segmenter, IoU per variant. The run is read
through `bgjax.workdir`. This module is the command only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app
from flax import nnx

from bgjax import clflags, config_utils, parallel, tasks, variants, xla_options
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import in9, pipeline
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
    by_index: bool = False,
) -> dict[str, Any]:
    """Restore `workdir`'s checkpoint `step` (latest if None), evaluate and write the results
    to `out_dir` (default `workdir/eval/step_<N>`). Returns results.json's content. A run that
    needs masks the dataset lacks, or whose classes are not the dataset's (`by_index`: class i
    is class i whatever the names), is refused before anything is restored. Another `dataset`
    than the training one starts its data.* keys afresh (`workdir.saved_config`)."""
    config = workdir_lib.saved_config(workdir, overrides=overrides, dataset=dataset)
    data_config = tasks.get(config).eval_data(config)
    split = split or data_lib.default_split(data_config.name)
    source = data_lib.get_source(data_config, split)
    tasks.require_masks(
        source, variant_names, config, command="bgjax eval", released=_released(source)
    )
    tasks.check_label_space(
        config, workdir_lib.read_info(workdir), source.info, by_index=by_index
    )  # fmt: skip
    run = workdir_lib.restore(workdir, step, overrides=overrides, dataset=dataset)
    results = dict(run.metadata(), split=split, trained_on=run.info.name, framework="jax")
    results.update(_provenance(config.data, run.mean, run.std, "training dataset", by_index))
    results.update(
        tasks.score(
            run,
            source,
            variant_names,
            batch_size=batch_size or config.eval.batch_size,
            image_size=config.data.image_size,
            eval_resize=pipeline.EvalResize.from_config(config.data),
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
    normalization: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """An imported timm model, no workdir: a bgjax family through `models.from_timm`, any
    other timm model (MobileNet-v3, EfficientNet, DPN...) run by PyTorch behind the same call
    (`models.torch_timm`); results.json's "framework" says which ("jax" | "torch"). Its input
    normalisation: `mean`/`std`, else `normalization` ("imagenet" | "in9"), else the weights
    file's metadata ("mean"/"std"), else for a 1000-class model timm's pretrained config
    (PyTorch models) or ImageNet's; another model without any of these
    is refused (a 9-class IN-9 model was trained with the IN-9 statistics, not ImageNet's)."""
    from bgjax import models

    base = ml_collections.ConfigDict(
        dict(seed=0, mesh=[("data", -1)], data=dict(name=dataset, image_size=image_size))
    )
    config = config_utils.apply_overrides(base, overrides or {}, allow_new=True)
    split = split or data_lib.default_split(config.data.name)
    mesh = parallel.make_mesh(config.mesh)
    source = data_lib.get_source(config.data, split)
    tasks.require_masks(
        source, variant_names, None, command="bgjax eval", released=_released(source)
    )
    if name in models.names():
        model = models.from_timm(name, os.fspath(weights), img_size=config.data.image_size)
        framework = "jax"
    else:  # any other timm model, run by PyTorch behind the same call (the parity extra)
        from bgjax.models.torch_timm import TorchModel

        model, framework = TorchModel.from_weights(name, weights), "torch"
    mean, std, norm_from = pretrained_normalization(
        weights, model.num_classes, normalization=normalization, mean=mean, std=std,
        model_default=getattr(model, "pretrained_normalization", None),
    )  # fmt: skip
    results = dict(
        step=0,
        dataset=config.data.name,
        split=split,
        pretrained=name,
        weights=os.fspath(weights),
        init_weights=workdir_lib.weights_provenance(weights),  # the file's sha256
        model=name,
        framework=framework,
        masking="none",
        mask_source="gt",
        train_variant=None,
        **_provenance(config.data, mean, std, norm_from, False),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    evaluator = classify.Evaluator(
        graphdef, mesh, num_classes=model.num_classes, mean=mean, std=std,
        masked=getattr(model, "masking", "none") != "none",
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
            eval_resize=pipeline.EvalResize.from_config(config.data),
            **classify.SCORE_OPTIONS,
        )  # fmt: skip
    )
    tasks.write_results(results, out_dir)
    return results


NORMALIZATIONS = {
    "imagenet": (data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD),
    "in9": (in9.MEAN, in9.STD),
}


def pretrained_normalization(
    weights: str | os.PathLike,
    num_classes: int,
    *,
    normalization: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_default: tuple[Sequence[float], Sequence[float], str] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from) of an imported model (see `evaluate_pretrained`);
    `model_default` (mean, std, origin), timm's pretrained config of a PyTorch model, replaces
    ImageNet's default for a 1000-class model (DPN's statistics are not ImageNet's)."""
    if (mean is None) != (std is None):
        raise ValueError("--mean and --std go together: give both (three values each)")
    if mean is not None:
        if normalization:
            raise ValueError("give --normalization or --mean/--std, not both")
        picked, origin = (tuple(mean), tuple(std)), "--mean/--std"
    elif normalization:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {normalization!r}; known: {sorted(NORMALIZATIONS)}")
        picked, origin = NORMALIZATIONS[normalization], f"--normalization={normalization}"
    elif (stored := _weights_normalization(weights)) is not None:
        picked, origin = stored, f"metadata of {os.fspath(weights)}"
    elif num_classes == 1000 and model_default is not None:
        picked, origin = model_default[:2], model_default[2]
    elif num_classes == 1000:
        picked, origin = NORMALIZATIONS["imagenet"], "ImageNet default (1000-class model)"
    else:
        raise ValueError(
            f"{os.fspath(weights)}: a {num_classes}-class model whose weights carry no "
            "mean/std metadata; say how it was trained: --normalization=imagenet|in9 or "
            "--mean=R,G,B --std=R,G,B"
        )
    for key, values in zip(("mean", "std"), picked):
        if len(values) != 3 or (key == "std" and min(values) <= 0):
            raise ValueError(f"normalisation {key} must be 3 values (std > 0), got {values}")
    return tuple(map(float, picked[0])), tuple(map(float, picked[1])), origin


def _weights_normalization(weights) -> tuple[Sequence[float], Sequence[float]] | None:
    """mean/std from a .safetensors header's metadata ("mean"/"std" as JSON lists, or timm's
    "pretrained_cfg" JSON holding them); None when absent."""
    # A missing file is from_timm's error to report (tests hand it a stand-in model).
    if not os.fspath(weights).endswith(".safetensors") or not os.path.isfile(weights):
        return None
    from safetensors import safe_open

    with safe_open(os.fspath(weights), "np") as f:
        meta = f.metadata() or {}
    try:
        found = json.loads(meta["pretrained_cfg"]) if "pretrained_cfg" in meta else meta
        if "mean" not in found or "std" not in found:
            return None
        parse = lambda v: json.loads(v) if isinstance(v, str) else v
        return tuple(parse(found["mean"])), tuple(parse(found["std"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.fspath(weights)}: unreadable mean/std metadata ({e})") from e


def _released(source) -> Sequence[str]:
    """The variants `source` reads from released files rather than compositing them."""
    return getattr(source, "released_variants", ())


def _provenance(data_config, mean, std, norm_from: str, by_index: bool) -> dict[str, Any]:
    """What results.json records so that two results can be compared knowingly (the resize
    rule and image size come with the evaluator's results)."""
    return dict(
        normalization={"mean": list(mean), "std": list(std), "from": norm_from},
        variants_from=data_config.get("variants_from"),
        label_mapping="by_index" if by_index else "by_name",
    )


# --------------------------------------------------------------------------------------------
# Command line

_WORKDIR = clflags.string("workdir", None, "Training workdir to evaluate.")
_STEP = clflags.checkpoint_step("step")
_ALL_STEPS = clflags.boolean("all_steps", False, "Evaluate every saved checkpoint step.")
_DATASET = clflags.string("dataset", None, "Dataset name (default: the training config's).")
_VARIANTS = clflags.string("variants", "all", "'all' or a comma-separated list of variants.")
_SPLIT = clflags.string("split", None, "Split to evaluate (default: test; in9: val).")
_BATCH_SIZE = clflags.integer("batch_size", None, "Global eval batch (default config.eval's).")
_OUT = clflags.string("out", None, "Output folder (default WORKDIR/eval/step_<N>).")
_PRETRAINED = clflags.string("pretrained", None, "timm model name of an imported model.")
_WEIGHTS = clflags.string("weights", None, "timm weights (.safetensors/.pth) for --pretrained.")
_NORMALIZATION = clflags.string(
    "normalization", None, "--pretrained input statistics: imagenet | in9 (default: the "
    "weights' metadata, else ImageNet's for 1000-class models).")  # fmt: skip
_MEAN = clflags.string("mean", None, "--pretrained input mean, R,G,B (with --std).")
_STD = clflags.string("std", None, "--pretrained input std, R,G,B (with --mean).")
_REGENERATE = clflags.boolean(
    "regenerate", False, "IN-9: rebuild the variants from original/ + fg_mask instead of "
    "scoring the released folders (= --config.data.variants_from=regenerated).")  # fmt: skip
_LABEL_MAP = clflags.string(
    "label_map", "by_name", "by_name: the run's class names must be the dataset's; by_index: "
    "class i is class i (same class count, other names).")  # fmt: skip
# `--config.<key>=value` overrides of the saved config (its keys are known only from the
# workdir): defined from argv by the parser bgjax.cli calls.
flags_parser = config_utils.parse_flags_with_overrides


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from e


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed()
    xla_options.enable_compilation_cache()
    try:
        names = variants.parse(_VARIANTS.value)
        overrides = config_utils.override_flag_values()
        if _REGENERATE.value:
            overrides["data.variants_from"] = "regenerated"
        if _LABEL_MAP.value not in ("by_name", "by_index"):
            raise app.UsageError(f"--label_map {_LABEL_MAP.value!r}: by_name or by_index")
        if _PRETRAINED.value:
            if not (_WEIGHTS.value and _DATASET.value and _OUT.value):
                raise app.UsageError("--pretrained needs --weights, --dataset and --out")
            results = evaluate_pretrained(
                _PRETRAINED.value, _WEIGHTS.value, _DATASET.value, out_dir=_OUT.value,
                variant_names=names, split=_SPLIT.value, overrides=overrides,
                batch_size=_BATCH_SIZE.value or 64, normalization=_NORMALIZATION.value,
                mean=_floats(_MEAN.value, "--mean"), std=_floats(_STD.value, "--std"),
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
                out_dir=out, by_index=_LABEL_MAP.value == "by_index",
            )  # fmt: skip
            print(tasks.results_markdown(results))
    except (FileNotFoundError, ImportError, ValueError) as e:  # ImportError: a missing extra
        print(f"bgjax eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser)
