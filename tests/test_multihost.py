"""Two processes x 2 CPU devices (launch/local.sh) train like one process x 4 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bgjax import config_utils, train

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic.py:arch=vit,size=tiny"  # a packaged config, by name
# The launcher runs $PYTHON: this interpreter, whether or not its venv is on PATH.
ENV = dict(os.environ, PYTHON=sys.executable)
OVERRIDES = ["--config.progress_bar=False", "--config.total_steps=4", "--config.eval.every_steps=2"]


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    config = config_utils.load_config(TINY)
    config.progress_bar, config.total_steps, config.eval.every_steps = False, 4, 2
    train.train(config, str(tmp_path / "one"))

    cmd = ["bash", "launch/local.sh", "2", "-d", "2", "-l", str(tmp_path / "logs"), "--"]
    cmd += [f"--config={TINY}", f"--workdir={tmp_path / 'two'}", *OVERRIDES]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr + logs[-4000:]

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for key in ("train/loss", "train/grad_norm", "eval/original/accuracy"):
        a = [m[key] for m in one if key in m]
        b = [m[key] for m in two if key in m]
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=key)
    # Each process wrote its own Grain iterator state into the shared checkpoint.
    data_dir = tmp_path / "two" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_local_launcher_fails_when_a_process_fails(tmp_path):
    cmd = ["bash", "launch/local.sh", "2", "--", f"--config={tmp_path}/missing.py"]
    cmd += [f"--workdir={tmp_path}/w"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0
    assert "missing.py" in done.stdout + done.stderr


def test_local_launcher_usage_error():
    done = subprocess.run(
        ["bash", "launch/local.sh", "two"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage" in done.stderr
