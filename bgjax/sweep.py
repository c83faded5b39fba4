r"""`bgjax sweep`: expand a grid of training runs, then run them here or print cluster commands.

    bgjax sweep --config sweeps/synthetic_tiny.py --workdir runs/tiny                    # local
    bgjax sweep --config sweeps/masking_scaling.py --workdir gs://b/scaling \
        --launch print --cluster slurm > jobs.sh
    bgjax aggregate runs/tiny                                       # evaluate + tabulate + plot

A sweep config's `get_config(arg)` returns:

    base       the experiment config file every run starts from, e.g. "cub.py"
    base_arg   its fixed `get_config` argument, e.g. "mode=finetune" (optional)
    overrides  config keys set in every run, as a nested ConfigDict (optional)
    axes       [(axis, points), ...]: the grid is their product, in this order. A point is a
               value of the axis (axis "arg.strategy" -> the base config's `strategy` argument;
               axis "seed" or "optimizer.lr" -> that config key), or a dict of several such
               settings: {"name": "convnext_t", "arg.arch": "convnext", "model.name": ...}.
    evals      what `bgjax aggregate` evaluates: [{"name", "split", "variants", "data"}], where
               `data` updates config.data for that evaluation (e.g. another dataset).

Run `ROOT/<name>/` is named by its points ("convnext_t-early-seed0"). Overridden keys must
exist in the base config, so that every run can also be written as a `bgjax train` command.
A run is finished when its checkpoint at `total_steps` exists; `local` skips finished runs and
resumes unfinished ones through the trainer's own restore. ROOT/sweep.json records the grid.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, logging
from etils import epath

from bgjax import clflags, config_utils
from bgjax import train as train_lib  # defines the trainer's flags first (see clflags)
from bgjax import workdir as workdir_lib

LAUNCH_MODES = ("local", "print")
CLUSTERS = ("slurm", "tpu")
ARG_PREFIX = "arg."
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.=+-]+")


# ---------------------------------------------------------------------------------------------
# Grid expansion


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid: the base config file + its argument + config key overrides."""

    name: str
    base: str  # config file (path or packaged name), as the sweep config wrote it
    arg: str  # "k=v,..." for the base config's get_config
    overrides: tuple[tuple[str, Any], ...]  # (dotted key, value), in grid order
    points: tuple[tuple[str, str], ...]  # (axis, point name)

    def config(self) -> ml_collections.ConfigDict:
        config = config_utils.load_config(f"{self.base}:{self.arg}")
        return config_utils.apply_overrides(config, dict(self.overrides), where=f"run {self.name}")

    def train_args(self, root: str) -> list[str]:
        """`bgjax train` arguments of this run (relative paths as the sweep config gave them)."""
        args = ["--config", f"{self.base}:{self.arg}" if self.arg else self.base]
        args += ["--workdir", os.path.join(root, self.name)]
        args += [f"--config.{key}={cli_value(value)}" for key, value in self.overrides]
        return args


def cli_value(value: Any) -> str:
    """A value as `--config.key=` text that ml_collections' flag parser reads back."""
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def _point(axis: str, value: Any) -> tuple[str, dict[str, Any]]:
    """(name, {setting: value}) of one grid point."""
    if isinstance(value, Mapping):
        settings = {k: v for k, v in value.items() if k != "name"}
        if not settings:
            raise ValueError(f"axis {axis!r}: a point sets nothing: {dict(value)}")
        name = value.get("name") or "_".join(str(v) for v in settings.values())
    else:
        settings = {axis: value}
        leaf = axis.split(".")[-1]
        name = str(value) if axis.startswith(ARG_PREFIX) else f"{leaf}{value}"
    return _NAME_CHARS.sub("_", str(name)), settings


def expand(sweep: ml_collections.ConfigDict) -> list[Run]:
    """The runs of a sweep config, in grid order (the last axis varies fastest)."""
    for key in ("base", "axes"):
        if key not in sweep:
            raise ValueError(f"sweep config has no {key!r}; it needs base and axes")
    axes = [(axis, [_point(axis, v) for v in values]) for axis, values in sweep.axes]
    for axis, points in axes:
        if not points:
            raise ValueError(f"sweep axis {axis!r} has no points")
        names = [n for n, _ in points]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep axis {axis!r} has points with equal names: {names}")
    base_arg = _parse_arg_text(sweep.get("base_arg") or "")
    fixed = config_utils.flatten(sweep.get("overrides") or {})
    runs = []
    for combo in itertools.product(*(points for _, points in axes)):
        arg, overrides = dict(base_arg), dict(fixed)
        for _, settings in combo:
            for key, value in settings.items():
                if key.startswith(ARG_PREFIX):
                    arg[key[len(ARG_PREFIX) :]] = value
                else:
                    overrides[key] = value
        runs.append(
            Run(
                name="-".join(name for name, _ in combo),
                base=sweep.base,
                arg=",".join(f"{k}={v}" for k, v in arg.items()),
                overrides=tuple(overrides.items()),
                points=tuple((axis, name) for (axis, _), (name, _) in zip(axes, combo)),
            )
        )
    return runs


def _parse_arg_text(text: str) -> dict[str, str]:
    arg = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"sweep base_arg item {item!r} is not of the form key=value")
        arg[key.strip()] = value.strip()
    return arg


# ---------------------------------------------------------------------------------------------
# The manifest


def write_manifest(root: str, sweep: ml_collections.ConfigDict, runs: Sequence[Run]) -> str:
    """ROOT/sweep.json: the sweep config and its runs, read by `bgjax aggregate`."""
    path = epath.Path(root) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(
        sweep=json.loads(sweep.to_json_best_effort()),
        runs=[
            dict(name=r.name, base=r.base, arg=r.arg, overrides=dict(r.overrides),
                 points=dict(r.points))
            for r in runs
        ],
    )  # fmt: skip
    path.write_text(json.dumps(manifest, indent=2))
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Launchers


def run_local(root: str, runs: Sequence[Run], *, progress: bool = True) -> dict[str, str]:
    """Train the runs one after another in this process: {name: "skipped" | "trained"}."""
    import tqdm

    status = {}
    bar = tqdm.tqdm(runs, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        workdir = os.path.join(root, run.name)
        config = run.config()
        workdir_lib.check_same_config(workdir, config)
        if workdir_lib.is_finished(workdir, config.total_steps):
            logging.info("sweep: %s is finished, skipping", run.name)
            status[run.name] = "skipped"
            continue
        config.progress_bar = progress and config.get("progress_bar", True)
        train_lib.train(config, workdir)
        status[run.name] = "trained"
    bar.close()
    return status


def launch_commands(
    root: str, runs: Sequence[Run], cluster: str, tpu: Sequence[str] = ("bgjax", "", "")
) -> list[str]:
    """One shell command per run for a Slurm cluster or a TPU pod (the `launch/` scripts).

    `tpu` = (pod name, zone, accelerator type) for `launch/tpu_pod.sh`; the commands share the
    pod, so a script of them trains the runs one after another (it keeps the pod)."""
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; expected one of {CLUSTERS}")
    commands = []
    for run in runs:
        args = " ".join(shlex.quote(a) for a in run.train_args(root))
        if cluster == "slurm":
            commands.append(f"sbatch --job-name={shlex.quote(run.name)} launch/slurm.sbatch {args}")
        else:
            if not all(tpu):
                raise ValueError(f"--cluster tpu needs --tpu_name, --tpu_zone, --tpu_type: {tpu}")
            pod = " ".join(shlex.quote(t) for t in tpu)
            commands.append(f"launch/tpu_pod.sh {pod} -- {args}")
    return commands


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = clflags.config_file("config", "sweep config: sweeps/<name>.py[:arg] or a path")
_WORKDIR = clflags.string("workdir", None, "Root folder of the sweep's runs.")
_LAUNCH = clflags.string("launch", "local", "local: train here one by one; print: commands.")
_CLUSTER = clflags.string("cluster", "slurm", "For --launch print: slurm | tpu.")
_TPU_NAME = clflags.string("tpu_name", "bgjax", "--cluster tpu: the pod (created if needed).")
_TPU_ZONE = clflags.string("tpu_zone", None, "--cluster tpu: its zone, e.g. us-central2-b.")
_TPU_TYPE = clflags.string("tpu_type", None, "--cluster tpu: accelerator type, e.g. v4-32.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _LAUNCH.value not in LAUNCH_MODES:
        raise app.UsageError(f"--launch must be one of {LAUNCH_MODES}, got {_LAUNCH.value!r}")
    try:
        runs = expand(_CONFIG.value)
        write_manifest(_WORKDIR.value, _CONFIG.value, runs)  # for `bgjax aggregate`
        if _LAUNCH.value == "print":
            tpu = (_TPU_NAME.value, _TPU_ZONE.value, _TPU_TYPE.value)
            print("\n".join(launch_commands(_WORKDIR.value, runs, _CLUSTER.value, tpu)))
            return
        status = run_local(_WORKDIR.value, runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, state in status.items():
        print(f"{state:8s} {name}")
