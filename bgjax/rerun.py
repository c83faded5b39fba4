"""Whether a rerun may resume a run: its config and data against the run's saved ones.

Rerunning the same command resumes (README, "Resume / preemption"). A rerun may change only the
config keys SAFE_ON_RESUME; any other change to config.json, or training data of other classes or
normalisation than dataset_info.json, would make the checkpoints another run's, and
`check_same_config` refuses it in one line before the workdir is touched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from etils import epath

from bgjax import config_utils
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib

# Keys a rerun may change and still resume the run (README, "Resume / preemption"): how long it
# trains (the schedule's length and warm-up follow), how often it logs, evaluates and saves, how
# fast it reads, the mesh (a checkpoint restores onto another), where the same data lives, and the
# learning rate and clipping that a NaN stop asks to lower or enable, and the blocks' remat policy
# (`model.remat`: memory, not the parameters or the math). `model.scan_blocks` is no such key: it
# stores each stack of blocks as one stacked array, so the checkpoints' layout follows it.
# Any other change (model, data, task, masks, recipe) would make the checkpoints another run's:
# it is refused.
SAFE_ON_RESUME = (
    "total_steps",
    "epochs",
    "optimizer.warmup_steps",
    "optimizer.lr",
    "optimizer.clip_norm",
    "log_every_steps",
    "progress_bar",
    "data_workers",
    "prefetch_to_device",
    "mesh",
    "eval.every_steps",
    "eval.batch_size",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save",
    "data.root",
    "data.data_dir",
    "data.cub_root",
    "data.places_root",
    "data.segmentations",
    "eval.data.root",
    "model.remat",
)
_ABSENT = "(absent)"


class ConfigChanged(ValueError):
    """A rerun's config differs from the run's config.json in keys not SAFE_ON_RESUME."""


def config_changes(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, new value)} where `config` differs from the run's config.json ({}
    without one). A key config.json lacks was added to the config files since the run was
    written; it keeps the model's default, so it is no change."""
    path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
    if not path.exists():
        return {}
    saved = config_utils.flatten(json.loads(path.read_text()))
    wanted = config_utils.flatten(json.loads(config.to_json_best_effort()))
    return {
        key: (saved[key], wanted.get(key, _ABSENT))
        for key in sorted(saved)
        if saved[key] != wanted.get(key, _ABSENT)
    }


def check_same_config(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    info: data_lib.DatasetInfo | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Refuse (`ConfigChanged`, one line naming each key, old -> new) to resume a run with a
    config that differs from its config.json in keys not SAFE_ON_RESUME, or with training data
    of other classes or normalisation than its dataset_info.json. A run without a checkpoint
    has nothing to lose: it starts afresh with the new config. Returns the changes allowed."""
    workdir = epath.Path(workdir)
    changes = config_changes(workdir, config)
    info_path = workdir / workdir_lib.INFO_FILE
    if info is not None and info_path.exists():
        saved_info = json.loads(info_path.read_text())
        for key, value in json.loads(json.dumps(workdir_lib.info_json(info))).items():
            if saved_info.get(key) != value:
                changes[f"{workdir_lib.INFO_FILE}:{key}"] = (saved_info.get(key), value)
    refused = {k: v for k, v in changes.items() if k not in SAFE_ON_RESUME}
    if refused and workdir_lib.latest_step(workdir) is not None:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigChanged(
            f"{workdir} holds a run with another config ({shown}); only "
            f"{', '.join(SAFE_ON_RESUME[:4])}, ... (bgjax.rerun.SAFE_ON_RESUME) may change on "
            "resume: rerun with the saved values, or use another --workdir"
        )
    return changes
