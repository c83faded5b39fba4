"""metrics.jsonl after a resume holds each step once; TensorBoard events reach the disk at once."""

import json
import time

import pytest

from bgjax import metric_writer


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_rows_past_the_restored_step(tmp_path):
    path = tmp_path / metric_writer.METRICS_FILE
    rows = [json.dumps({"step": step, "train/loss": 1.0 / step}) for step in range(1, 11)]
    path.write_text("\n".join(rows) + '\n{"step": 1')  # the crash cut the last row short

    writer = metric_writer.MetricWriter(tmp_path, enabled=True, resume_step=6)
    assert _steps(path) == [1, 2, 3, 4, 5, 6]  # before anything new is written
    for step in (7, 8):
        writer.write(step, {"train/loss": 0.5})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads(path.read_text().splitlines()[5])["train/loss"] == pytest.approx(1 / 6)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_start_keeps_nothing_of_a_crashed_attempt(tmp_path):
    path = tmp_path / metric_writer.METRICS_FILE
    path.write_text('{"step": 1}\n{"step": 2}\n')
    metric_writer.MetricWriter(tmp_path, enabled=True, resume_step=0).close()
    assert path.read_text() == ""


def test_tensorboard_events_reach_the_disk_without_close(tmp_path):
    """A killed run's event file held only its header: tensorboardX flushed every 2 minutes."""
    pytest.importorskip("tensorboardX")
    writer = metric_writer.MetricWriter(tmp_path, enabled=True)
    writer.write(1, {"train/loss": 0.25})
    (events,) = (tmp_path / metric_writer.TENSORBOARD_DIR).glob("events.out.tfevents.*")
    deadline = time.monotonic() + 10  # its writer thread flushes each second
    while b"train/loss" not in events.read_bytes():
        assert time.monotonic() < deadline, "the event never reached the file"
        time.sleep(0.1)
    writer.close()
