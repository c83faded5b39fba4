"""Sweeps: grid expansion, local launch with skip-finished, printed cluster commands, aggregate."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from bgjax import aggregate, config_utils, rerun, sweep
from bgjax import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
TINY = "sweeps/synthetic_tiny.py"  # a packaged config, by name


@pytest.fixture(scope="module")
def tiny():
    return config_utils.load_config(TINY)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny):
    """The tiny sweep trained locally once, then run again (everything finished)."""
    root = str(tmp_path_factory.mktemp("sweep"))
    runs = sweep.expand(tiny)
    sweep.write_manifest(root, tiny, runs)
    first = sweep.run_local(root, runs, progress=False)
    second = sweep.run_local(root, runs, progress=False)
    return root, runs, first, second


def test_expand_names_and_settings(tiny):
    runs = sweep.expand(tiny)
    assert [r.name for r in runs] == [
        "embed_dim16-none-seed0",
        "embed_dim16-early-seed0",
        "embed_dim32-none-seed0",
        "embed_dim32-early-seed0",
    ]
    config = runs[3].config()
    assert config.model.embed_dim == 32 and config.model.masking == "early" and config.seed == 0
    assert config.eval.every_steps == 0


def test_expand_dict_points_and_errors():
    sweep_config = ml_collections.ConfigDict(
        dict(
            base="configs/synthetic.py",  # the old repository-relative spelling still works
            base_arg="size=tiny",
            axes=[
                ("model", [{"name": "vt", "arg.arch": "vit"}, {"arg.arch": "convnext"}]),
                ("optimizer.lr", [0.1]),
            ],
        )
    )
    runs = sweep.expand(sweep_config)
    assert [r.name for r in runs] == ["vt-lr0.1", "convnext-lr0.1"]
    assert runs[1].config().model.name.startswith("convnext")
    assert runs[0].config().optimizer.lr == 0.1

    sweep_config.axes = [("model.no_such_key", [1])]
    with pytest.raises(ValueError, match="model.no_such_key"):
        sweep.expand(sweep_config)[0].config()
    sweep_config.axes = [("seed", [])]
    with pytest.raises(ValueError, match="no points"):
        sweep.expand(sweep_config)


def test_local_launch_trains_then_skips(swept):
    root, runs, first, second = swept
    assert {name: d["trained"] for name, d in first.items()} == {r.name: True for r in runs}
    assert {name: d["trained"] for name, d in second.items()} == {r.name: False for r in runs}
    assert all(d["wall_s"] > 0 and d["cpu_s"] > 0 for d in first.values())
    for run in runs:
        assert workdir_lib.latest_step(Path(root) / run.name) == run.config().total_steps


def test_changed_grid_is_refused(swept):
    root, runs, _, _ = swept
    config = runs[0].config()
    config.optimizer.wd = 0.5  # the recipe (optimizer.lr would be safe on resume)
    with pytest.raises(ValueError, match=r"another config \(optimizer.wd: 0.05 -> 0.5\)"):
        rerun.check_same_config(Path(root) / runs[0].name, config)


def test_aggregate_tables_and_plots(swept):
    root, runs, _, _ = swept
    rows = aggregate.collect(root, progress=False)
    paths = aggregate.write_outputs(root, rows)
    assert sorted(r["run"] for r in rows) == sorted(r.name for r in runs)
    by_name = {r["run"]: r for r in rows}
    small, large = by_name["embed_dim16-none-seed0"], by_name["embed_dim32-none-seed0"]
    assert small["params"] < large["params"]
    assert {by_name[r.name]["strategy"] for r in runs} == {"none", "early"}
    for row in rows:
        iid, ood = row["metrics"]["iid"], row["metrics"]["ood"]
        assert set(iid) >= {"original", "mixed_rand", "only_bg_t", "bg_gap"}
        assert 0.0 <= ood["worst_group_accuracy"] <= ood["original"] <= 1.0
    saved = json.loads(Path(paths["json"]).read_text())
    assert len(saved) == len(runs)
    assert "embed_dim32-early-seed0" in Path(paths["md"]).read_text()
    for key in ("scaling", "progress"):
        assert Path(paths[key]).stat().st_size > 0
    # Results are written per run and read back, not recomputed.
    run_dir = Path(root) / runs[0].name
    results = list(run_dir.glob("eval/step_*/iid/results.json"))
    assert len(results) == 1
    mtime = results[0].stat().st_mtime
    aggregate.collect(root, progress=False)
    assert results[0].stat().st_mtime == mtime


def _parse_train_command(args):
    """The config a `bgjax train` command line resolves to, through ml_collections' flags."""
    fv, argv = flags.FlagValues(), ["prog", *args]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv.config, fv.workdir


def test_print_commands_reproduce_the_runs(tiny):
    runs = sweep.expand(tiny)
    commands = sweep.launch_commands("ROOT", runs, "slurm")
    assert len(commands) == len(runs)
    for run, command in zip(runs, commands):
        words = shlex.split(command)
        script = words.index("launch/slurm.sbatch")
        assert words[:2] == ["sbatch", f"--job-name={run.name}"]
        assert "--gpus-per-task=1" in words[:script] and "--nodes=1" in words[:script]
        args = words[script + 1 :]
        at = args.index("--config") + 1
        args[at] = config_utils.resolve_config(args[at])  # the packaged name, as `bgjax train` does
        config, workdir = _parse_train_command(args)
        assert workdir == f"ROOT/{run.name}"
        assert config.to_dict() == run.config().to_dict()
    tpu = sweep.launch_commands("ROOT", runs[:1], "tpu", ("pod", "zone-a", "v4-8"))
    assert shlex.split(tpu[0])[:5] == ["launch/tpu_pod.sh", "pod", "zone-a", "v4-8", "--"]
    with pytest.raises(ValueError, match="tpu_zone"):
        sweep.launch_commands("ROOT", runs, "tpu", ("pod", "", ""))


def test_print_mode_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bgjax.cli", "sweep", "--config", TINY, "--workdir",
         str(tmp_path), "--launch", "print"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all("launch/slurm.sbatch" in line for line in lines)
    assert not list(tmp_path.glob("*/checkpoints"))  # printing trains nothing


def test_masking_sweep_uses_a_segmenter_stage_by_default():
    """The masking paper's protocol: stage 0 trains the CUB segmenter (scored on CUB and
    Waterbirds), every masked run of stage 1 uses its masks; `masks=gt` drops the stage."""
    config = config_utils.load_config("sweeps/masking_scaling.py:cub_root=/cub,waterbirds_root=/wb")
    jobs = sweep.expand(config, root="ROOT")
    assert jobs[0].name == "segmenter" and jobs[0].stage == 0
    assert [e["name"] for e in jobs[0].evals] == ["cub_masks", "waterbirds_masks"]
    assert jobs[0].config().task == "segment" and jobs[0].config().data.root == "/cub"
    classifiers = jobs[1:]
    assert len(classifiers) == 21 and {j.stage for j in classifiers} == {1}
    for job in classifiers:
        config = job.config()
        expected = "gt" if config.model.masking == "none" else "ROOT/segmenter"
        assert config.get("mask_source", "gt") == expected, job.name
    gt_jobs = sweep.expand(config_utils.load_config("sweeps/masking_scaling.py:masks=gt"))
    assert len(gt_jobs) == 21 and all(j.config().mask_source == "gt" for j in gt_jobs)


def test_status_names_each_runs_state(swept, tmp_path):
    """`bgjax sweep --status ROOT`: finished, running, failed, stopped, not started."""
    import shutil

    from bgjax import lock

    src, runs, _, _ = swept
    root = tmp_path / "root"
    sweep.write_manifest(str(root), config_utils.load_config(TINY), runs)
    shutil.copytree(Path(src) / runs[0].name, root / runs[0].name)  # finished
    shutil.copytree(Path(src) / runs[1].name, root / runs[1].name)
    me = dict(host=socket.gethostname(), pid=os.getpid())
    (root / runs[1].name / lock.LOCK_FILE).write_text(json.dumps(me))
    shutil.rmtree(root / runs[1].name / "checkpoints" / "6")  # a trainer on it, short of 6
    (root / runs[2].name).mkdir()
    shutil.copy(Path(src) / runs[2].name / "config.json", root / runs[2].name / "config.json")
    lock.record_failure(root / runs[2].name, RuntimeError("NaN loss at step 3"))
    states = {name: (state, detail) for name, state, detail in sweep.status(str(root))}
    assert states[runs[0].name] == ("finished", "step 6/6")
    assert states[runs[1].name][0] == "running"
    assert states[runs[2].name][0] == "failed" and "NaN loss at step 3" in states[runs[2].name][1]
    assert states[runs[3].name] == ("not started", "")
    out = subprocess.run(
        [sys.executable, "-m", "bgjax.cli", "sweep", "--status", str(root)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "1 finished, 1 running, 1 failed, 1 not started" in out
