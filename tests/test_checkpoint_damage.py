"""A damaged checkpoint step (an array file truncated or deleted, state/_METADATA deleted):
training resumes from the previous good step with one line, evaluation says so in one line."""

import gc
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bgjax import checkpoint, evaluate, parallel


def _largest_array_file(step_dir):
    """The biggest chunk file Orbax's OCDBT store wrote for the state (it holds array data)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def _delete_array_file(step_dir):
    _largest_array_file(step_dir).unlink()


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


DAMAGE = {
    "truncated array file": (_truncate, "state/ does not read back"),
    "deleted array file": (_delete_array_file, "state/ does not read back"),
    "deleted state/_METADATA": (_delete_metadata, "state/_METADATA is missing"),
}


def _state(mesh, offset=0.0):
    replicated = NamedSharding(mesh, P())
    tree = {"w": jnp.arange(2000.0).reshape(50, 40) + offset, "opt": [jnp.ones(3), (jnp.zeros(2),)]}
    return jax.device_put(tree, replicated)


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


@pytest.fixture
def two_steps(tmp_path):
    """Steps 1 and 2 saved (different values) in tmp_path/ckpt."""
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    saver.save(1, _state(mesh))
    saver.save(2, _state(mesh, offset=1.0))
    saver.close()
    return tmp_path / "ckpt", _state(mesh)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_falls_back_and_is_named(two_steps, damage, capsys, caplog):
    directory, step1 = two_steps
    make_damage, reason = DAMAGE[damage]
    make_damage(directory / "2")
    assert checkpoint.is_finalized(directory / "2")  # not torn: its commit records are there

    # Evaluation: one line naming the step, what is wrong and the steps left; nothing moved.
    reader = checkpoint.Checkpointer(directory, read_only=True)
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        reader.restore_partial(2, {"w": _abstract(step1)["w"]})
    reader.close()
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    assert f"checkpoint step 2 in {directory} is damaged ({reason}" in message
    assert message.endswith("other steps (--step): 1")
    assert (directory / "2").is_dir()

    # Training: step 2 moved aside with one line, step 1 restored, step 2 saved again.
    capsys.readouterr()
    ckpt = checkpoint.Checkpointer(directory)
    step, restored = ckpt.restore_latest(_abstract(step1))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"skipping damaged checkpoint {directory / '2'} ({reason}")
    assert lines[0].endswith("moved to 2.damaged") and lines[1].startswith("resumed from step 1")
    assert step == 1 and (directory / "2.damaged").is_dir() and ckpt.all_steps() == [1]
    jax.tree.map(np.testing.assert_array_equal, restored, step1)
    ckpt.save(2, restored)
    ckpt.close()
    assert checkpoint.Checkpointer(directory).all_steps() == [1, 2]
    gc.collect()  # asyncio reports the failed restore's other reads as their futures go
    assert not [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_state_that_does_not_fit_is_not_taken_for_damage(two_steps):
    directory, step1 = two_steps
    other_model = dict(_abstract(step1), w=jax.ShapeDtypeStruct((7, 3), jnp.float32))
    ckpt = checkpoint.Checkpointer(directory)
    with pytest.raises(ValueError) as error:
        ckpt.restore_latest(other_model)
    ckpt.close()
    assert not isinstance(error.value, checkpoint.DamagedCheckpoint)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing moved aside


def test_evaluation_reads_without_orbax_warnings(two_steps, caplog):
    directory, step1 = two_steps
    with caplog.at_level(logging.WARNING):
        reader = checkpoint.Checkpointer(directory, read_only=True)
        reader.restore_partial(2, {"w": _abstract(step1)["w"]})
        assert reader.best_step() == 2
        reader.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("kind", ["Future", "Task"])
def test_unretrieved_read_errors_of_a_failed_restore_are_dropped(kind):
    """asyncio reports each other array read of a failed restore as a never-retrieved Future or
    Task (which one depends on timing); both are dropped, anything else goes through."""
    checkpoint.quiet_failed_reads()
    asyncio_logger = logging.getLogger("asyncio")

    def record(message, error):
        return asyncio_logger.makeRecord(
            "asyncio", logging.ERROR, __file__, 1, message, (), (type(error), error, None)
        )

    read = ValueError('OUT_OF_RANGE: Error reading "w" in OCDBT database at local file "/x/"')
    other = ValueError("something else went wrong")
    assert not asyncio_logger.filter(record(f"{kind} exception was never retrieved", read))
    assert asyncio_logger.filter(record(f"{kind} exception was never retrieved", other))
    assert asyncio_logger.filter(record("Task was destroyed but it is pending!", read))


def test_saves_without_metrics_do_not_warn_and_best_is_announced(tmp_path, caplog, capsys):
    """Orbax warned "Requested `tracked_metric`; did not provide metrics" at each save without
    an evaluation; best-step retention still ranks only the evaluated steps."""
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    ckpt = checkpoint.Checkpointer(
        tmp_path, keep=1, keep_best=1, best_metric="acc", best_mode="max", async_save=False
    )
    with caplog.at_level(logging.WARNING):
        for step, acc in [(1, None), (2, 0.5), (3, None), (4, 0.3), (5, None)]:
            ckpt.save(step, _state(mesh), metrics=None if acc is None else {"acc": acc})
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert ckpt.all_steps() == [2, 5] and ckpt.best_step() == 2
    ckpt.close()
    out = capsys.readouterr().out
    assert "new best acc 0.5000 at step 2" in out and "at step 4" not in out
    assert all(f"saved step {s} in {tmp_path}" in out for s in range(1, 6))


# ---------------------------------------------------------------------------------------------
# The scenario through `bgjax train` and `bgjax eval`

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic.py:arch=vit,size=tiny"  # 6 steps, evaluated and saved at 3 and 6


def _bgjax_train(workdir):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the rerun compiles nothing
    cmd = [sys.executable, "-m", "bgjax.cli", "train", f"--config={TINY}", f"--workdir={workdir}"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # What a user sees, less the progress bar's redraws.
    lines = (run.stdout + run.stderr).replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("train:")]


@pytest.mark.slow  # two tiny `bgjax train` runs in subprocesses
def test_command_line_output_and_resume_before_a_damaged_step(tmp_path):
    workdir = tmp_path / "run"
    lines = _bgjax_train(workdir)
    # bgjax's own lines only: no Orbax INFO (~40 per save before), no warning of Orbax's about
    # saves without metrics, no "read only" notices of the evaluation.
    assert not [line for line in lines if re.match(r"[IWE]\d{4} ", line)], lines  # absl's format
    assert not [line for line in lines if "tracked_metric" in line or "read only" in line]
    assert lines[0].startswith("new best eval/original/accuracy ") and "at step 3" in lines[0]
    assert lines[1] == f"saved step 3 in {workdir / 'checkpoints'}", lines
    assert f"saved step 6 in {workdir / 'checkpoints'}" in lines and len(lines) <= 5, lines

    for path in (workdir / "checkpoints" / "6" / "state").rglob("d/*"):  # params and the rest
        os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ValueError) as error:  # `bgjax eval` prints it as its one error line
        evaluate.evaluate_checkpoint(str(workdir), 6)
    message = str(error.value)
    assert f"checkpoint step 6 in {workdir / 'checkpoints'} is damaged" in message
    assert message.endswith("other steps (--step): 3") and "\n" not in message

    lines = _bgjax_train(workdir)  # the same command again
    assert lines[0].startswith(f"skipping damaged checkpoint {workdir / 'checkpoints' / '6'} (")
    assert lines[0].endswith("moved to 6.damaged") and len(lines) <= 5, lines
    assert lines[1] == f"resumed from step 3 ({workdir / 'checkpoints'})", lines
    assert f"saved step 6 in {workdir / 'checkpoints'}" in lines
    assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [3, 6]
    # Steps 4-6 were logged twice; metrics.jsonl keeps each once, the rerun's.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
