"""One trainer per workdir: a live holder is named and refused, a dead one's lock is taken over,
stale Orbax temporaries are cleaned, failures are noted for `bgjax sweep --status`."""

import json
import os
import socket
import subprocess
import sys

import pytest

from bgjax import config_utils, lock, train, workdir


def _write_lock(path, pid, host=None):
    path.mkdir(parents=True, exist_ok=True)
    holder = dict(host=host or socket.gethostname(), pid=pid, since="2026-12-05 10:00:00")
    (path / lock.LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_second_holder_is_refused_and_named(tmp_path):
    with lock.hold(tmp_path):
        held = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(lock.WorkdirLocked, match=rf"pid {os.getpid()} on .* since"):
            with lock.hold(tmp_path):
                pass
        assert (tmp_path / lock.LOCK_FILE).exists()  # the refused one took nothing away
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_dead_holder_is_taken_over_and_temporaries_cleaned(tmp_path, caplog):
    _write_lock(tmp_path, _dead_pid())
    stale = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-123"
    stale.mkdir(parents=True)
    (stale / "x").write_text("partial")
    with lock.hold(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not stale.exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "dead trainer" in messages and "interrupted save" in messages


def test_other_hosts_lock_is_reported_with_a_hint(tmp_path):
    _write_lock(tmp_path, 12345, host="elsewhere-node")
    with pytest.raises(lock.WorkdirLocked, match="elsewhere-node.*delete"):
        with lock.hold(tmp_path):
            pass


def test_train_refuses_a_locked_workdir_before_writing(tmp_path):
    config = config_utils.load_config("synthetic.py:size=tiny")
    _write_lock(tmp_path, os.getpid())  # a live trainer: this very process
    with pytest.raises(lock.WorkdirLocked):
        train.train(config, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_FILE]


def test_run_state(tmp_path):
    assert workdir.run_state(tmp_path / "none", 10) == ("not started", "")
    failed = tmp_path / "failed"
    failed.mkdir()
    lock.record_failure(failed, ValueError("bad config"))  # before the run wrote anything
    assert not (failed / lock.FAILED_FILE).exists()
    (failed / "config.json").write_text("{}")
    lock.record_failure(failed, ValueError("unknown masking 'bogus'\nmore"))
    state, detail = workdir.run_state(failed, 10)
    assert state == "failed" and detail.endswith("ValueError: unknown masking 'bogus'")
    _write_lock(failed, os.getpid())
    assert workdir.run_state(failed, 10)[0] == "running"
    lock.record_failure(failed, None)
    assert not (failed / lock.FAILED_FILE).exists()


def test_init_weights_provenance(tmp_path):
    """A run records the weights it started from by content (issue: provenance)."""
    import hashlib

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights" * 1000)
    info = workdir.weights_provenance(weights)
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["bytes"] == 18000 and info["given"] == str(weights)
    config = config_utils.load_config("synthetic.py:size=tiny")
    config.model.init = str(weights)
    from bgjax import data

    run, info_ = tmp_path / "run", data.get_source(config.data, "train").info
    workdir.write_run_files(run, config, info_)
    assert workdir.init_weights(run) == info
    config.model.init = ""
    workdir.write_run_files(tmp_path / "scratch", config, info_)
    assert workdir.init_weights(tmp_path / "scratch") is None
