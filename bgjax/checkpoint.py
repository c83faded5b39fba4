"""Checkpoints: one Orbax `CheckpointManager` step = train state + the Grain iterator state.

    <workdir>/checkpoints/<step>/state/   model params (+ other NNX state), optimizer state, step,
                                          RNG key, EMA (orbax StandardSave, sharded arrays)
                                 /data/    each process's Grain iterator state (JSON)

Saves are asynchronous (training continues while the files are written) and collective: every
process calls `save`, Orbax writes each process's shards and lets the primary host finalise.
Retention: the newest `keep` steps (resume never loses the latest) plus the `keep_best` steps
with the best validation metric.

Finalisation in orbax-checkpoint 0.12.8: a step is written into `<step>.orbax-checkpoint-tmp*`
and atomically renamed to `<step>` (on object stores, where renames are not atomic, a
`commit_success.txt` marks it instead). Orbax ignores tmp dirs, but on a local filesystem it
treats ANY `<step>` directory as complete. A step dir that lost its finalisation records
(`_CHECKPOINT_METADATA` with a commit timestamp, or `commit_success.txt`) - a partial copy or
sync, a crash on a filesystem without atomic rename - is "torn": `Checkpointer` moves it aside
to `<step>.torn` with a message and resumes from the previous good step.

Preemption: `PreemptionWatcher` turns SIGTERM into "save at the next step boundary and exit 0".
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA = "state", "data"
_METADATA_FILE = "_CHECKPOINT_METADATA"
_COMMIT_FILE = "commit_success.txt"


def is_finalized(step_dir: epath.PathLike) -> bool:
    """Whether a `<step>` directory carries Orbax's finalisation records (see module doc)."""
    step_dir = epath.Path(step_dir)
    if (step_dir / _COMMIT_FILE).exists():
        return True
    try:
        metadata = json.loads((step_dir / _METADATA_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return metadata.get("commit_timestamp_nsecs") is not None


def _quarantine_torn_steps(directory: epath.Path) -> list[int]:
    """Move torn `<step>` dirs aside (primary process only); returns their steps."""
    torn = []
    if not directory.exists():
        return torn
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.is_dir() and path.name.isdigit() and not is_finalized(path):
            torn.append(int(path.name))
            if jax.process_index() == 0:
                target = path.parent / f"{path.name}.torn"
                if target.exists():
                    target.rmtree()
                path.rename(target)
    return torn


class Checkpointer:
    """Orbax manager for (train state, Grain iterator) in `directory`."""

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        keep: int = 2,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        """read_only: for evaluation next to a live run: nothing is moved, deleted or written;
        torn steps are only left out of `all_steps`."""
        self.directory = epath.Path(directory).absolute()
        torn = [] if read_only else _quarantine_torn_steps(self.directory)
        if jax.process_count() > 1 and not read_only:
            multihost_utils.sync_global_devices("bgjax.checkpoint.quarantine")
        for step in torn:
            logging.warning(
                "checkpoint step %d in %s is torn (no finalisation record): moved to %s.torn; "
                "resuming from the previous complete step",
                step,
                self.directory,
                step,
            )
            print(f"skipping torn checkpoint {self.directory / str(step)} (moved to {step}.torn)")
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]
        best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
        if keep_best > 0 and best_fn:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric = best_metric
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE, DATA),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                best_fn=best_fn,  # for best_step()
                best_mode=best_mode,
                enable_async_checkpointing=async_save,
                create=not read_only,
                read_only=read_only,
            ),
        )

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Complete steps, ascending (Orbax alone would also list torn ones; see module doc)."""
        return [s for s in self.manager.all_steps() if is_finalized(self.directory / str(s))]

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (the latest if no step has the metric)."""
        return self.manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Start saving (returns once arrays are copied off the accelerator; files follow)."""
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None  # BestN ranks only steps that carry the metric
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s leaves say.

        `abstract_state` leaves are `jax.ShapeDtypeStruct`s whose `.sharding` may belong to a
        different mesh than the one that saved (4 devices -> 2): Orbax reshards on read. The
        Grain iterator, if given, is set to the saved position in place.
        """
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_partial(self, step: int, abstract_subtree: dict[str, Any]) -> dict[str, Any]:
        """Only the top-level entries of the saved state that `abstract_subtree` names (e.g.
        the params, not the optimizer state): for evaluation. The StandardSave'd state is read
        through its underlying PyTree handler, the one that supports partial restores."""
        reader = ocp.CheckpointManager(
            self.directory,
            item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True),
        )
        args = ocp.args.PyTreeRestore(
            abstract_subtree,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
            partial_restore=True,
        )
        try:
            return reader.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
        finally:
            reader.close()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionWatcher:
    """SIGTERM -> `should_stop(step)` becomes True at a step boundary, on every process.

    Multi-process runs use JAX's preemption sync service (started by `jax.distributed`, which
    catches SIGTERM itself) so all processes stop at the same step; a single process installs
    its own handler. Use as a context manager; the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[..., Any] | int | None = None

    def __enter__(self) -> PreemptionWatcher:
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled
                pass
        return self.requested
