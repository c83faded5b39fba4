r"""`bgjax sweep`: expand a grid of training runs, then run them here or print cluster commands.

    bgjax sweep --config sweeps/synthetic_tiny.py --workdir runs/tiny                    # local
    bgjax sweep --config sweeps/masking_scaling.py --workdir gs://b/scaling \
        --launch print --cluster slurm > jobs.sh
    bgjax sweep --config sweeps/masking_scaling.py --workdir /shared/scaling --launch slurm
    bgjax sweep --status /shared/scaling             # finished / running / failed / stopped
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
    resources  Slurm: {nodes, gpus_per_node, cpus_per_gpu, time} of each run (default: 1 GPU)
    selection  optional: `bgjax aggregate` picks each method's hyperparameters by a validation
               metric and reports test mean ± std over seeds (`bgjax.selection.Selection`:
               metric "val:worst_group_accuracy", method_axes ("method",), seed_axis "seed")

or, when some runs need others finished first (a segmenter whose masks later runs use),

    stages     [stage, ...], each with the keys above (`evals` defaulting to the sweep's), run
               in order; a stage of one run may give `name` instead of `axes`.

A string value may contain "{root}", the sweep's root folder ("{root}/segmenter": a run of an
earlier stage). Run `ROOT/<name>/` is named by its points ("convnext_t-early-seed0"). Overridden
keys must exist in the base config, so that every run can also be written as a `bgjax train`
command. A run is finished when its checkpoint at `total_steps` exists; `local` skips finished
runs, resumes unfinished ones through the trainer's own restore, and stops at a preemption
(SIGTERM: that run's checkpoint is saved; the same command resumes). ROOT/sweep.json records the
grid.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, logging
from etils import epath

from bgjax import clflags, config_utils, rerun
from bgjax import selection as selection_lib
from bgjax import train as train_lib  # defines the trainer's flags first (see clflags)
from bgjax import workdir as workdir_lib

LAUNCH_MODES = ("local", "print", "slurm")
CLUSTERS = ("slurm", "tpu")
ARG_PREFIX = "arg."
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.=+-]+")


# ---------------------------------------------------------------------------------------------
# Grid expansion


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the sweep: the base config file + its argument + key overrides."""

    name: str  # its folder under the sweep root
    base: str  # config file (path or packaged name), as the sweep config wrote it
    arg: str  # "k=v,..." for the base config's get_config
    overrides: tuple[tuple[str, Any], ...]  # (dotted key, value), in grid order
    points: tuple[tuple[str, str], ...]  # (axis, point name)
    stage: int = 0  # jobs of a stage start once the earlier stages' jobs finished
    evals: tuple[Mapping[str, Any], ...] | None = None  # `bgjax aggregate`'s; None: default
    resources: tuple[tuple[str, Any], ...] = ()  # Slurm: nodes, gpus_per_node, cpus_per_gpu, time

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


def _with_root(value: Any, root: str | None, key: str) -> Any:
    if not isinstance(value, str) or "{root}" not in value:
        return value
    if root is None:
        raise ValueError(f"sweep key {key!r} = {value!r} needs the sweep root (--workdir)")
    return value.replace("{root}", os.fspath(root))


STAGE_KEYS = {"name", "base", "base_arg", "overrides", "axes", "evals", "resources"}
# What one Slurm job asks for unless the sweep (or its stage) says `resources`: one GPU.
DEFAULT_RESOURCES = dict(nodes=1, gpus_per_node=1, cpus_per_gpu=12, time="24:00:00")


def expand(sweep: ml_collections.ConfigDict, root: str | None = None) -> list[Job]:
    """The jobs of a sweep config, stage by stage, each stage in grid order (the last axis
    varies fastest); "{root}" in a value becomes `root`."""
    if sweep.get("selection") is not None:  # a mistake shows now, not after the training
        selection_lib.Selection.parse(sweep.selection)
    stages = sweep.get("stages")
    if stages is None:
        return _expand_stage(sweep, 0, sweep.get("evals"), _resources(sweep, {}), root)
    jobs: list[Job] = []
    for index, stage in enumerate(stages):
        unknown = set(stage.keys()) - STAGE_KEYS
        if unknown:
            raise ValueError(f"sweep stage {index}: unknown keys {sorted(unknown)}")
        evals = stage.get("evals", sweep.get("evals"))
        resources = _resources(stage, _resources(sweep, {}))
        jobs += _expand_stage(stage, index, evals, resources, root)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep stages name the same run twice: {names}")
    return jobs


def _resources(spec: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    given = dict(spec.get("resources") or {})
    unknown = set(given) - set(DEFAULT_RESOURCES)
    if unknown:
        raise ValueError(f"sweep resources: unknown keys {sorted(unknown)}; known: "
                         f"{sorted(DEFAULT_RESOURCES)}")  # fmt: skip
    return {**DEFAULT_RESOURCES, **default, **given}


def _expand_stage(stage, index: int, evals, resources, root) -> list[Job]:
    if "base" not in stage or not ("axes" in stage or "name" in stage):
        raise ValueError(
            f"sweep config (stage {index}) needs base and axes (or name, for a single run)"
        )
    axes = [(axis, [_point(axis, v) for v in values]) for axis, values in stage.get("axes", [])]
    for axis, points in axes:
        if not points:
            raise ValueError(f"sweep axis {axis!r} has no points")
        names = [n for n, _ in points]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep axis {axis!r} has points with equal names: {names}")
    base_arg = _parse_arg_text(stage.get("base_arg") or "")
    fixed = config_utils.flatten(stage.get("overrides") or {})
    evals = None if evals is None else tuple(dict(e) for e in evals)
    jobs = []
    for combo in itertools.product(*(points for _, points in axes)):
        arg, overrides = dict(base_arg), dict(fixed)
        for _, settings in combo:
            for key, value in settings.items():
                if key.startswith(ARG_PREFIX):
                    arg[key[len(ARG_PREFIX) :]] = value
                else:
                    overrides[key] = value
        overrides = {k: _with_root(v, root, k) for k, v in overrides.items()}
        jobs.append(
            Job(
                name="-".join(name for name, _ in combo) or _NAME_CHARS.sub("_", stage["name"]),
                base=stage["base"],
                arg=",".join(f"{k}={v}" for k, v in arg.items()),
                overrides=tuple(overrides.items()),
                points=tuple((axis, name) for (axis, _), (name, _) in zip(axes, combo)),
                stage=index,
                evals=evals,
                resources=tuple(resources.items()),
            )
        )
    return jobs


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


def write_manifest(root: str, sweep: ml_collections.ConfigDict, jobs: Sequence[Job]) -> str:
    """ROOT/sweep.json: the sweep config and its runs (with their evals), read by `bgjax
    aggregate`."""
    path = epath.Path(root) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(
        sweep=json.loads(sweep.to_json_best_effort()),
        runs=[
            dict(name=j.name, base=j.base, arg=j.arg, overrides=dict(j.overrides),
                 points=dict(j.points), stage=j.stage, evals=j.evals)
            for j in jobs
        ],
    )  # fmt: skip
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Launchers


class Interrupted(Exception):
    """SIGTERM / preemption arrived during a run: its checkpoint is saved. The sweep stops
    (rather than start the next run) so that the same command resumes it."""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_local(root: str, jobs: Sequence[Job], *, progress: bool = True) -> dict[str, dict]:
    """Train the jobs one after another in this process, in stage order:
    {name: {"trained": bool, "wall_s", "cpu_s"}}. Raises `Interrupted` at a preemption."""
    import tqdm

    done = {}
    bar = tqdm.tqdm(jobs, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.name)
        wall, cpu = time.perf_counter(), cpu_seconds()
        workdir = os.path.join(root, job.name)
        config = job.config()
        rerun.check_same_config(workdir, config)
        trained = not workdir_lib.is_finished(workdir, config.total_steps)
        if trained:
            config.progress_bar = progress and config.get("progress_bar", True)
            if train_lib.train(config, workdir)["preempted"]:
                raise Interrupted(f"interrupted during {workdir}; its checkpoint is saved")
        else:
            logging.info("sweep: %s is finished, skipping", job.name)
        done[job.name] = dict(
            trained=trained, wall_s=time.perf_counter() - wall, cpu_s=cpu_seconds() - cpu
        )
    bar.close()
    return done


def launch_commands(
    root: str, jobs: Sequence[Job], cluster: str, tpu: Sequence[str] = ("bgjax", "", "")
) -> list[str]:
    """One shell command per job for a Slurm cluster or a TPU pod (the `launch/` scripts).

    Slurm: each job asks for its `resources` (one GPU unless the sweep says otherwise); with
    several stages, a stage's jobs wait for every job of the earlier stages
    (`--dependency=afterok`, stage i's job ids collected in $BGJAX_STAGE<i>_JOBS). `tpu` =
    (pod name, zone, accelerator type) for `launch/tpu_pod.sh`; the commands share the pod, so
    a script of them trains the jobs one after another, stages in order."""
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; expected one of {CLUSTERS}")
    if cluster == "tpu" and not all(tpu):
        raise ValueError(f"--cluster tpu needs --tpu_name, --tpu_zone, --tpu_type: {tpu}")
    staged = len({j.stage for j in jobs}) > 1
    last_stage = max((j.stage for j in jobs), default=0)
    commands = []
    for job in jobs:
        args = " ".join(shlex.quote(a) for a in job.train_args(root))
        if cluster == "tpu":
            pod = " ".join(shlex.quote(t) for t in tpu)
            commands.append(f"launch/tpu_pod.sh {pod} -- {args}")
            continue
        sbatch = f"sbatch --job-name={shlex.quote(job.name)} {slurm_resources(job)}"
        if staged and job.stage > 0:
            earlier = "".join(f"$BGJAX_STAGE{i}_JOBS" for i in range(job.stage))
            sbatch += f" --dependency=afterok{earlier}"
        command = f"{sbatch} launch/slurm.sbatch {args}"
        if staged and job.stage < last_stage:  # later stages wait for it
            sbatch_job = f"$({sbatch} --parsable launch/slurm.sbatch {args})"
            command = f'BGJAX_STAGE{job.stage}_JOBS+=":{sbatch_job}"'
        commands.append(command)
    return commands


def slurm_resources(job: Job) -> str:
    """sbatch options for the job's resources: they override launch/slurm.sbatch's defaults."""
    r = dict(job.resources) or DEFAULT_RESOURCES
    return (
        f"--nodes={r['nodes']} --ntasks-per-node={r['gpus_per_node']} --gpus-per-task=1 "
        f"--cpus-per-task={r['cpus_per_gpu']} --time={r['time']}"
    )


def submit_slurm(root: str, jobs: Sequence[Job], *, sbatch: str = "sbatch") -> list[str]:
    """Submit the jobs as Slurm job arrays, one per stage and resource set (a later stage's
    arrays wait for the earlier ones); returns the array job ids. Each array task reads its
    `bgjax train` arguments from line SLURM_ARRAY_TASK_ID of ROOT/slurm/<array>.args."""
    folder = epath.Path(root) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.stage, slurm_resources(job)), []).append(job)
    ids: list[str] = []
    done_stages: dict[int, list[str]] = {}
    for index, ((stage, resources), members) in enumerate(sorted(groups.items())):
        name = f"stage{stage}-{index}"
        args_file = folder / f"{name}.args"
        lines = (" ".join(shlex.quote(a) for a in j.train_args(root)) for j in members)
        args_file.write_text("".join(f"{line}\n" for line in lines))
        command = [sbatch, "--parsable", f"--array=0-{len(members) - 1}",
                   f"--job-name={epath.Path(root).name}-{name}", *resources.split()]  # fmt: skip
        earlier = [i for s, group in done_stages.items() if s < stage for i in group]
        if earlier:
            command.append("--dependency=afterok:" + ":".join(earlier))
        command += ["launch/slurm.sbatch", "--args_file", os.fspath(args_file)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:4])} ... failed: {done.stderr.strip()}")
        job_id = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        done_stages.setdefault(stage, []).append(job_id)
        ids.append(job_id)
        logging.info("submitted %s (%d runs) as job %s", name, len(members), job_id)
    return ids


def status(root: str) -> list[tuple[str, str, str]]:
    """(run, state, detail) for every run of the sweep in ROOT/sweep.json: finished, running,
    failed, stopped or not started (`bgjax.workdir.run_state`)."""
    manifest = epath.Path(root) / "sweep.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: is {root} a sweep root?")
    rows = []
    for run in json.loads(manifest.read_text())["runs"]:
        workdir = epath.Path(root) / run["name"]
        if workdir_lib.is_run(workdir):
            total = workdir_lib.read_config(workdir).total_steps
        else:
            job = Job(run["name"], run["base"], run["arg"], tuple(run["overrides"].items()), ())
            total = job.config().total_steps
        rows.append((run["name"], *workdir_lib.run_state(workdir, total)))
    return rows


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = clflags.config_file("config", "sweep config: sweeps/<name>.py[:arg] or a path")
_WORKDIR = clflags.string("workdir", None, "Root folder of the sweep's runs.")
_LAUNCH = clflags.string(
    "launch",
    "local",
    "local: train here one by one; print: the commands; slurm: submit job arrays.",
)
_STATUS = clflags.string("status", None, "Instead: list ROOT's runs as finished / running / ...")
_CLUSTER = clflags.string("cluster", "slurm", "For --launch print: slurm | tpu.")
_TPU_NAME = clflags.string("tpu_name", "bgjax", "--cluster tpu: the pod (created if needed).")
_TPU_ZONE = clflags.string("tpu_zone", None, "--cluster tpu: its zone, e.g. us-central2-b.")
_TPU_TYPE = clflags.string("tpu_type", None, "--cluster tpu: accelerator type, e.g. v4-32.")


def print_status(root: str) -> None:
    rows = status(root)
    width = max(len(name) for name, _, _ in rows)
    for name, state, detail in rows:
        print(f"{name:{width}s}  {state:11s}  {detail}".rstrip())
    counts = {}
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in counts.items()))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _STATUS.value is not None:
        try:
            print_status(_STATUS.value)
        except (FileNotFoundError, ValueError) as e:
            print(f"bgjax sweep: error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _LAUNCH.value not in LAUNCH_MODES:
        raise app.UsageError(f"--launch must be one of {LAUNCH_MODES}, got {_LAUNCH.value!r}")
    try:
        jobs = expand(_CONFIG.value, root=_WORKDIR.value)
        write_manifest(_WORKDIR.value, _CONFIG.value, jobs)  # for `bgjax aggregate`
        if _LAUNCH.value == "print":
            tpu = (_TPU_NAME.value, _TPU_ZONE.value, _TPU_TYPE.value)
            print("\n".join(launch_commands(_WORKDIR.value, jobs, _CLUSTER.value, tpu)))
            return
        if _LAUNCH.value == "slurm":
            ids = submit_slurm(_WORKDIR.value, jobs)
            print(f"submitted {len(jobs)} runs as Slurm job arrays {', '.join(ids)}; "
                  f"bgjax sweep --status {_WORKDIR.value}")  # fmt: skip
            return
        done = run_local(_WORKDIR.value, jobs)
    except Interrupted as e:
        print(f"bgjax sweep: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"bgjax sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, d in done.items():
        state = "trained" if d["trained"] else "skipped"
        print(f"{state:8s} {name}  ({d['wall_s']:.0f} s)")
