"""Sweeps: grid expansion, local launch with skip-finished, printed cluster commands, aggregate."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from bgjax import aggregate, config_utils, sweep
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
    config.optimizer.lr = 0.5
    with pytest.raises(ValueError, match="another config"):
        workdir_lib.check_same_config(Path(root) / runs[0].name, config)


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
        assert words[:3] == ["sbatch", f"--job-name={run.name}", "launch/slurm.sbatch"]
        args = words[3:]
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
