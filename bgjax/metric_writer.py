"""The trainer's metric logs: DIR/metrics.jsonl (one JSON row per logged step) and TensorBoard
events in DIR/tensorboard/ (tensorboardX), written by the main process only.

A resumed run restarts at its checkpoint step, after the crashed attempt may have logged
further steps: rows past that step are dropped from metrics.jsonl (the file is rewritten
atomically) and TensorBoard is told to hide its events past it (`purge_step`), so each step
appears once. metrics.jsonl is flushed at every write, the event file within a second (its
writer is a thread), so a killed run keeps what it logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def drop_rows_after(path: epath.PathLike, step: int) -> int:
    """Keep only the rows of a metrics.jsonl with `"step" <= step` (a torn last line goes too);
    returns how many rows were dropped. The file is replaced atomically."""
    path = epath.Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            row_step = None
        if row_step is not None and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        partial = path.parent / f"{path.name}.tmp"
        partial.write_text("".join(kept))
        os.replace(partial, path)
    return dropped


class MetricWriter:
    """metrics.jsonl (+ TensorBoard events if tensorboardX is installed), process 0 only.

    resume_step: the step training restarts from (0 for a fresh run): logged rows past it are
    dropped, as the run logs those steps again."""

    def __init__(self, workdir: epath.PathLike, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        workdir = epath.Path(workdir)
        dropped = drop_rows_after(workdir / METRICS_FILE, resume_step)
        if dropped:
            logging.info("dropped %d metrics.jsonl rows past step %d", dropped, resume_step)
        self.file = (workdir / METRICS_FILE).open("a")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.info("tensorboardX is not installed: writing metrics.jsonl only")
        else:
            self.tb = SummaryWriter(
                str(workdir / TENSORBOARD_DIR),
                purge_step=resume_step + 1,
                flush_secs=1,  # its writer thread's period (default 2 minutes: lost on a kill)
            )

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
