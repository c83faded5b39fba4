"""`bgjax sweep --launch slurm` and launch/slurm.sbatch, against stand-in Slurm commands on PATH
that record what they were given."""

import os
import shlex
import subprocess
from pathlib import Path

from bgjax import demo, sweep

REPO = Path(__file__).resolve().parents[1]


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_submit_slurm_makes_one_array_per_stage_with_dependencies(tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    # Each call: its arguments on one line; a job id back ("id;cluster", as --parsable gives).
    _stand_in(bin_dir, "sbatch", f'echo "$*" >> {log}; echo $((100 + $(wc -l < {log})))";c1"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = tmp_path / "demo"
    _, jobs = demo.jobs(str(root))
    ids = sweep.submit_slurm(str(root), jobs)
    calls = log.read_text().splitlines()
    assert ids == ["101", "102", "103"] and len(calls) == 3  # segmenter, convnext, vit stages
    assert "--array=0-0" in calls[0] and "--dependency" not in calls[0]
    assert "--array=0-4" in calls[1] and "--dependency=afterok:101 " in calls[1]
    assert "--dependency=afterok:101:102 " in calls[2]
    assert all("--gpus-per-task=1" in c and "--time=24:00:00" in c for c in calls)
    args_file = Path(calls[1].split("--args_file ")[1])
    lines = args_file.read_text().splitlines()
    assert [shlex.split(line) for line in lines] == [j.train_args(str(root)) for j in jobs[1:6]]


def test_sbatch_script_trains_its_array_line(tmp_path):
    """launch/slurm.sbatch --args_file F runs `bgjax train` with line SLURM_ARRAY_TASK_ID + 1,
    quoting intact."""
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    _stand_in(bin_dir, "scontrol", "echo node-a")
    _stand_in(bin_dir, "srun", f'printf "%s\\n" "$@" > {log}')
    args_file = tmp_path / "a.args"
    args_file.write_text("--workdir /r/one\n--workdir '/r/two words' --config.seed=1\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1",
               SLURM_JOB_NODELIST="node-a", SLURM_JOB_ID="7", SLURM_NTASKS="1",
               SLURM_SUBMIT_DIR=str(tmp_path))  # fmt: skip
    subprocess.run(["bash", REPO / "launch" / "slurm.sbatch", "--args_file", str(args_file)],
                   env=env, check=True)  # fmt: skip
    words = log.read_text().splitlines()
    assert words[-4:] == ["bgjax", "--workdir", "/r/two words", "--config.seed=1"]
