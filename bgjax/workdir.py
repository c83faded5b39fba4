"""What a training run leaves on disk, and how to read it back: the one home of a run's files.

    DIR/config.json          the resolved config (written by the trainer; a rerun may change
                             only the keys `rerun.SAFE_ON_RESUME`, `rerun.check_same_config`)
    DIR/dataset_info.json    classes, habitats, image size and normalisation of the training data
    DIR/init_weights.json    the weights it started from: the path given, sha256, size
    DIR/metrics.jsonl        one row per logged step (+ DIR/tensorboard/ events)
    DIR/checkpoints/<step>/  Orbax: params, optimizer state, step, RNG, the Grain iterator
    DIR/eval/step_<N>/       `bgjax eval` results (results.json, results.md, variants.png)
    DIR/train.lock           while a trainer runs: its host, pid and start (one trainer per run)
    DIR/failed.txt           why the last training attempt stopped with an error

The trainer, `bgjax eval`, the analyses, sweeps, aggregation, `compare`, the demo and a
classifier's segmenter mask source all read runs through here; no other module opens
config.json or lists checkpoint steps.

    run = workdir.restore("runs/vit_late", step=None | "best" | N)
    run.model, run.config, run.info, run.step, run.mesh, run.mask_source
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from bgjax import checkpoint as checkpoint_lib
from bgjax import config_utils, parallel, tasks, train_state
from bgjax import data as data_lib
from bgjax import lock as lock_lib
from bgjax import masks as masks_lib
from bgjax.data import pipeline

CONFIG_FILE = "config.json"
INFO_FILE = "dataset_info.json"
INIT_FILE = "init_weights.json"
CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------------------------------------
# The run files


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` holds a training run (its config.json)."""
    return (epath.Path(path) / CONFIG_FILE).exists()


def _require(workdir: epath.Path, name: str, what: str = "a training workdir") -> epath.Path:
    path = workdir / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} {what}?")
    return path


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run's resolved config (config.json)."""
    path = _require(epath.Path(workdir), CONFIG_FILE)
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def read_info(workdir: str | os.PathLike) -> data_lib.DatasetInfo:
    """What a restored model needs of its training data: classes, habitats, image size and
    normalisation (labels empty)."""
    meta = json.loads(_require(epath.Path(workdir), INFO_FILE).read_text())
    return data_lib.DatasetInfo(
        name=meta["name"],
        split="train",
        class_names=tuple(meta["class_names"]),
        labels=np.zeros((0,), np.int32),
        habitat_names=None if meta["habitat_names"] is None else tuple(meta["habitat_names"]),
        image_size=meta["image_size"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )


def write_run_files(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict, info: data_lib.DatasetInfo
) -> None:
    """config.json and dataset_info.json (the main process calls this, after
    `rerun.check_same_config`: config.json is only ever replaced by the same config or one with
    changes `rerun.SAFE_ON_RESUME`). Each file is written whole, then renamed into place: a
    crash leaves the old one."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_whole(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))
    _write_whole(workdir / INFO_FILE, json.dumps(info_json(info), indent=2))
    init = config.model.get("init")
    if init:  # which weights the run started from, by content: a path alone can be replaced
        (workdir / INIT_FILE).write_text(json.dumps(weights_provenance(init), indent=2))


def _write_whole(path: epath.Path, text: str) -> None:
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(text)
    partial.replace(path)


def weights_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """{"given": the path as the user wrote it, "sha256", "bytes"} of a weights file."""
    digest, size = hashlib.sha256(), 0
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return dict(given=os.fspath(path), sha256=digest.hexdigest(), bytes=size)


def init_weights(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance of the weights the run started from (None: random initialisation)."""
    path = epath.Path(workdir) / INIT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def info_json(info: data_lib.DatasetInfo) -> dict[str, Any]:
    """What dataset_info.json records of `info` (`rerun.check_same_config` compares it)."""
    return dict(
        name=info.name,
        class_names=list(info.class_names),
        habitat_names=None if info.habitat_names is None else list(info.habitat_names),
        image_size=info.image_size,
        mean=list(info.mean),
        std=list(info.std),
    )


def saved_config(
    workdir: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> ml_collections.ConfigDict:
    """config.json with evaluation-time `--config.*` overrides and `--dataset` applied (the
    checkpoint fixes the model: `model.*` keys are refused). Another `dataset` than the
    training one keeps only the data keys of the evaluation itself (EVAL_DATA_KEYS), as the
    others describe the training data, and takes any `data.*` key its reader needs (data.root,
    data.label, ...); the training dataset takes its saved keys and EVAL_DATA_KEYS, so that a
    misspelt key is still an error."""
    config = read_config(workdir)
    overrides = dict(overrides or {})
    new_data = dataset is not None and dataset != config.data.name
    if new_data:
        kept = {k: config.data[k] for k in EVAL_DATA_KEYS if k in config.data}
        config.data = ml_collections.ConfigDict(dict(kept, name=dataset))
    free = {
        k: overrides.pop(k)
        for k in list(overrides)
        if k.startswith("data.") and (new_data or k.split(".", 1)[1] in EVAL_DATA_KEYS)
    }
    config = config_utils.apply_overrides(config, free, allow_new=True)
    return config_utils.apply_overrides(config, overrides, frozen=("model",))


# data.* keys about how a run is evaluated rather than which data it trained on.
EVAL_DATA_KEYS = ("image_size", "eval_resize", "crop_pct", "interpolation", "variants_from")


def eval_dir(workdir: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(workdir), "eval", f"step_{step}")


_STEP_DIR = re.compile(r"^step_(\d+)$")


def evaluated_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with an `eval/step_<N>/results.json`, ascending."""
    root = os.path.join(os.fspath(workdir), "eval")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, "results.json")):
            found.append(int(match[1]))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Checkpoint steps


def steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps, ascending; an error when there is none."""
    ckpt_dir = epath.Path(workdir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"no checkpoint in {workdir}: {ckpt_dir} does not exist (is it a training workdir?)"
        )
    found = sorted(
        int(p.name)
        for p in ckpt_dir.iterdir()
        if p.name.isdigit() and p.is_dir() and checkpoint_lib.is_finalized(p)
    )
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    return found


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step, or None (no checkpoint yet)."""
    try:
        return steps(workdir)[-1]
    except FileNotFoundError:
        return None


def is_finished(workdir: str | os.PathLike, total_steps: int) -> bool:
    step = latest_step(workdir)
    return step is not None and step >= total_steps


def best_step(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> int | None:
    """The kept step with the best `config.checkpoint.best_metric` (the latest without one)."""
    ckpt = checkpoint_lib.Checkpointer(
        epath.Path(workdir) / CHECKPOINTS,
        best_metric=config.checkpoint.best_metric,
        best_mode=config.checkpoint.best_mode,
        read_only=True,
    )
    try:
        return ckpt.best_step()
    finally:
        ckpt.close()


def resolve_steps(
    workdir: str | os.PathLike, step: int | str | None = None, all_steps: bool = False
) -> list[int]:
    """[step] after checking it exists ("best": the best kept step), every step, or [latest]."""
    found = steps(workdir)
    if all_steps:
        return found
    if step is None:
        return [found[-1]]
    if step == "best":
        step = best_step(workdir, read_config(workdir))
    if step not in found:
        raise ValueError(
            f"checkpoint step {step} does not exist in {epath.Path(workdir) / CHECKPOINTS}; "
            f"available steps: {', '.join(map(str, found))}"
        )
    return [step]


# ---------------------------------------------------------------------------------------------
# Restoring


@dataclasses.dataclass
class Restored:
    """A trained model from a workdir, with everything needed to feed it like the trainer."""

    workdir: str
    step: int
    model: nnx.Module
    config: ml_collections.ConfigDict  # the saved config with the overrides applied
    info: data_lib.DatasetInfo  # classes and the normalisation it was trained with
    mesh: jax.sharding.Mesh
    mask_source: masks_lib.MaskSource  # the batch's masks ("gt") or a segmenter's

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.info.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.info.std)

    def metadata(self) -> dict[str, Any]:
        c = self.config
        return dict(
            step=self.step,
            dataset=c.data.name,
            workdir=self.workdir,
            model=c.model.name,
            masking=c.model.get("masking", "none"),
            mask_source=c.get("mask_source", masks_lib.GT),
            mask_source_kind="ground_truth" if self.mask_source.is_gt else "segmenter",
            task=tasks.get(c).NAME,
            train_variant=c.get("train_variant"),
            init_weights=init_weights(self.workdir),
            image_size=c.data.image_size,
            eval_resize=pipeline.EvalResize.from_config(c.data).asdict(),
        )

    def out_dir(self) -> str:
        return eval_dir(self.workdir, self.step)


def restore(
    workdir: str | os.PathLike,
    step: int | str | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    overrides: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    use_ema: bool | None = None,
) -> Restored:
    """The model of checkpoint `step` (None: the latest; "best": by the run's best_metric; a
    missing one lists the available steps), without the optimizer state, on `mesh` (default:
    the run's config.mesh after the overrides), with its mask source. use_ema: take the EMA
    weights (default: config.eval.use_ema when the run kept an EMA)."""
    (step,) = resolve_steps(workdir, step)
    config = saved_config(workdir, overrides=overrides, dataset=dataset)
    info = read_info(workdir)
    mesh = mesh or parallel.make_mesh(config.mesh)
    setup = train_state.make_setup(config, info, mesh)
    if use_ema is None:
        use_ema = bool(config.eval.get("use_ema", False))
    weights = "ema" if use_ema and "ema" in setup.abstract else "params"
    ckpt = checkpoint_lib.Checkpointer(epath.Path(workdir) / CHECKPOINTS, read_only=True)
    try:
        names = (weights, "rest")
        restored = ckpt.restore_partial(step, {k: setup.abstract[k] for k in names})
    finally:
        ckpt.close()
    model = nnx.merge(setup.graphdef, restored[weights], restored["rest"])
    logging.info("restored %s (%s) from %s step %s", config.model.name, weights, workdir, step)
    mask_source = load_mask_source(
        config.get("mask_source", masks_lib.GT),
        mean=info.mean,
        std=info.std,
        mesh=mesh,
    )
    return Restored(os.fspath(workdir), step, model, config, info, mesh, mask_source)


def load_mask_source(
    mask_source: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: jax.sharding.Mesh | None = None,
) -> masks_lib.MaskSource:
    """`config.mask_source` -> a MaskSource. "gt": the batch's masks; otherwise the path of a
    segmenter workdir, checked (before restoring anything) to hold a segmenter run with a
    checkpoint, and restored onto `mesh` at its latest step; trained at another size than the
    classifier's `image_size`, it predicts at its own (`masks.MaskSource.predict`). `mean`/`std`
    are the classifier's normalisation; the segmenter's own is mapped to it exactly."""
    if mask_source == masks_lib.GT:
        return masks_lib.MaskSource()
    if not mask_source:
        raise ValueError("config.mask_source is empty: use 'gt' or a segmenter workdir")
    path = epath.Path(mask_source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"mask source {mask_source!r} is neither 'gt' nor an existing segmenter workdir"
        )
    what = "a segmenter training workdir"
    config = ml_collections.ConfigDict(json.loads(_require(path, CONFIG_FILE, what).read_text()))
    _require(path, INFO_FILE, what)
    task = tasks.get(config).NAME
    if not tasks.get(config).MASKS_ARE_TARGETS:
        raise ValueError(
            f"mask source {mask_source!r} is a {task!r} run, not a segmenter "
            f"(its config.json has task={task!r}; expected 'segment')"
        )
    if latest_step(path) is None:
        raise FileNotFoundError(
            f"segmenter workdir {path} has no checkpoint in {path / CHECKPOINTS}: train it first "
            f"(bgjax train --config segmenter.py --workdir {path})"
        )
    run = restore(path, mesh=mesh)
    return masks_lib.from_model(
        run.model,
        mean=mean,
        std=std,
        segmenter_mean=run.info.mean,
        segmenter_std=run.info.std,
        name=str(mask_source),
        image_size=int(config.data.image_size),
    )


# ---------------------------------------------------------------------------------------------
# The state a sweep reports


def run_state(workdir: str | os.PathLike, total_steps: int) -> tuple[str, str]:
    """(state, detail) of a run for `bgjax sweep --status`: finished | running | failed |
    stopped (checkpoints short of total_steps, no trainer) | not started."""
    workdir = epath.Path(workdir)
    step = latest_step(workdir) if workdir.exists() else None
    at = f"step {step or 0}/{total_steps}"
    if step is not None and step >= total_steps:
        return "finished", at
    holder = lock_lib.holder(workdir) if workdir.exists() else None
    if holder is not None and lock_lib.holder_alive(holder) is not False:
        return "running", f"{at}, pid {holder.get('pid')} on {holder.get('host')}"
    failed = workdir / lock_lib.FAILED_FILE
    if failed.exists():
        return "failed", f"{at}: {failed.read_text().strip()}"
    if step is not None:
        return "stopped", at
    return "not started", ""
