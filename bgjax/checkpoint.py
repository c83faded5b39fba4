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
to `<step>.torn` with a message and resumes from the previous good step. A finalised step whose
files do not read back (an array file truncated or deleted, `state/_METADATA` gone) is
"damaged": `restore_latest` moves it to `<step>.damaged` with one line saying what is wrong and
resumes from the previous good step; `restore_partial` (evaluation) raises `DamagedCheckpoint`,
one line naming the step and the other complete ones.

Messages (`bgjax.console.say`, one line each): "resumed from step N", "saved step N" (once
Orbax has committed it: at the next save, `wait` or `close`), "skipping torn / damaged
checkpoint N", "new best <metric> <value> at step N". Orbax's own logs show only with
`--verbosity` (`bgjax.console`); a step saved without evaluation carries empty metrics, so
that Orbax, which ranks steps by `best_metric`, does not warn at each of them.

Preemption: `PreemptionWatcher` turns SIGTERM into "save at the next step boundary and exit 0".
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import math
import signal
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from bgjax import console

STATE, DATA = "state", "data"
_METADATA_FILE = "_CHECKPOINT_METADATA"
_COMMIT_FILE = "commit_success.txt"
_TREE_METADATA_FILE = "_METADATA"  # the saved state's tree structure (Orbax PyTree handler)


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


def _move_aside(path: epath.Path, suffix: str) -> None:
    """`<step>` -> `<step><suffix>` (primary process only; a previous one there is replaced)."""
    if jax.process_index() == 0:
        target = path.parent / f"{path.name}{suffix}"
        if target.exists():
            target.rmtree()
        path.rename(target)


def _quarantine_torn_steps(directory: epath.Path) -> list[int]:
    """Move torn `<step>` dirs aside (primary process only); returns their steps."""
    torn = []
    if not directory.exists():
        return torn
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.is_dir() and path.name.isdigit() and not is_finalized(path):
            torn.append(int(path.name))
            _move_aside(path, ".torn")
    return torn


class DamagedCheckpoint(ValueError):
    """A finalised checkpoint step whose files do not read back (see module doc)."""

    def __init__(self, directory: epath.Path, step: int, reason: str, hint: str = ""):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged ({reason}){hint}")


def _first_line(error: BaseException, limit: int = 200) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _missing_files(step_dir: epath.Path, data: bool) -> str | None:
    """What a finalised step lacks that Orbax would not name clearly (without the tree
    structure file a restore fails with a misleading pytree-structure error)."""
    if not (step_dir / STATE / _TREE_METADATA_FILE).exists():
        return f"{STATE}/{_TREE_METADATA_FILE} is missing"
    if data and not list((step_dir / DATA).glob("*.json")):
        return f"{DATA}/ holds no iterator state"
    return None


class _AfterFailedReads:
    """`sys.unraisablehook` that drops what a failed Orbax restore leaves behind: TensorStore
    reads completing after Orbax closed the event loop awaiting them ("Event loop is closed",
    one traceback each) and its never-awaited read coroutines. Anything else goes on."""

    def __init__(self, previous: Callable[[Any], None]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error, source = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        code = getattr(source, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        self.previous(unraisable)


class _UnretrievedReadErrors(py_logging.Filter):
    """asyncio's "Future/Task exception was never retrieved" (an ERROR with a traceback) for
    each other array read of a failed restore: the first error already said what is wrong."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).startswith(
            ("Future exception was never retrieved", "Task exception was never retrieved")
        )
        return not (unretrieved and "OCDBT database" in str(error))


def quiet_failed_reads() -> None:
    """Before an Orbax restore that may fail: what it leaves behind stays quiet (installed
    once per process; each filter lets everything else through)."""
    if not isinstance(sys.unraisablehook, _AfterFailedReads):
        sys.unraisablehook = _AfterFailedReads(sys.unraisablehook)
    asyncio_logger = py_logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_UnretrievedReadErrors())


def _read_state(step_dir: epath.Path, read: Callable[[Any, epath.Path], Any]) -> Any:
    """`read(handler, path)` of a step's state through Orbax's PyTree handler (the one that
    supports partial restores); the handler, unlike a Checkpointer, expects no step records
    (which would be warned about) in the item's own directory."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return read(handler, step_dir / STATE)
    finally:
        handler.close()


def find_damage(step_dir: epath.PathLike, data: bool = False) -> str | None:
    """Why a finalised step does not read back, or None. Reads every saved array to host
    memory (and, with `data`, each Grain iterator state): for after a restore failed, to tell
    damage from a state that does not fit the model."""
    step_dir = epath.Path(step_dir)
    missing = _missing_files(step_dir, data)
    if missing:
        return missing
    try:
        tree = _read_state(step_dir, lambda handler, path: handler.metadata(path).tree)
        to_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        args = ocp.args.PyTreeRestore(restore_args=to_host)
        _read_state(step_dir, lambda handler, path: handler.restore(path, args=args))
    except Exception as error:  # TensorStore raises bare Exceptions and ValueErrors
        return f"{STATE}/ does not read back: {_first_line(error)}"
    for path in (step_dir / DATA).glob("*.json") if data else ():
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as error:
            return f"{DATA}/{path.name} does not read back: {_first_line(error)}"
    return None


@contextlib.contextmanager
def _quiet_read_only():
    """Orbax warns "Given directory is read only" each time evaluation opens a run."""
    absl_logger = logging.get_absl_logger()
    notice = console.DropMessages("Given directory is read only")
    absl_logger.addFilter(notice)
    try:
        yield
    finally:
        absl_logger.removeFilter(notice)


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
            console.say(
                f"skipping torn checkpoint {self.directory / str(step)} (no finalisation "
                f"record): moved to {step}.torn"
            )
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max(1, keep))]
        best_fn = None
        if best_metric:  # a step saved without the metric (no evaluation) ranks last
            worst = -math.inf if best_mode == "max" else math.inf
            best_fn = lambda metrics: metrics.get(best_metric, worst)
        if keep_best > 0 and best_fn:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric, self.best_mode = best_metric, best_mode
        self._unreported: int | None = None  # a save not yet known to be committed
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,  # for best_step()
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # Orbax warns when it has to reset it
        )
        with _quiet_read_only() if read_only else contextlib.nullcontext():
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=(STATE, DATA), options=options
            )
        self._best = self._best_so_far() if best_metric and not read_only else None

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Complete steps, ascending (Orbax alone would also list torn ones; see module doc)."""
        return [s for s in self.manager.all_steps() if is_finalized(self.directory / str(s))]

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (the latest if no step has the metric)."""
        best = self.manager.best_step()  # None when no step was saved with metrics
        return self.latest_step() if best is None else best

    def _best_so_far(self) -> float | None:
        values = [
            (self.manager.metrics(step) or {}).get(self.best_metric) for step in self.all_steps()
        ]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return max(values) if self.best_mode == "max" else min(values)

    def _report_new_best(self, step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.best_metric)
        if value is None:
            return
        best = self._best
        if best is None or (value > best if self.best_mode == "max" else value < best):
            self._best = value
            console.say(f"new best {self.best_metric} {value:.4f} at step {step}")

    def _report_saved(self) -> None:
        """Once Orbax has finished the pending save: "saved step N"."""
        step, self._unreported = self._unreported, None
        if step is not None and is_finalized(self.directory / str(step)):
            console.say(f"saved step {step} in {self.directory}")

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Start saving (returns once arrays are copied off the accelerator; files follow)."""
        self.manager.wait_until_finished()  # Orbax would wait for the previous save anyway
        self._report_saved()
        if self.best_metric:
            # Orbax warns at each save without metrics when it ranks steps; best_fn ranks an
            # empty dict last.
            metrics = dict(metrics or {})
            self._report_new_best(step, metrics)
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self._unreported = step
        if not self.manager.is_saving_in_progress():
            self._report_saved()

    def _read(self, step: int, read: Callable[[], Any], *, data: bool, hint: str = "") -> Any:
        """`read()`; when it fails on a step whose files do not read back, DamagedCheckpoint."""
        step_dir = self.directory / str(step)
        reason = _missing_files(step_dir, data)
        if reason is None:
            quiet_failed_reads()  # set before: they arrive as the failed restore returns
            try:
                return read()
            except Exception as error:  # TensorStore raises bare Exceptions
                reason = find_damage(step_dir, data)
                if reason is None:
                    raise  # the files are fine: the state does not fit (another model)
                raise DamagedCheckpoint(self.directory, step, reason, hint) from error
        raise DamagedCheckpoint(self.directory, step, reason, hint)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """The state at `step`, laid out as `abstract_state`'s leaves say.

        `abstract_state` leaves are `jax.ShapeDtypeStruct`s whose `.sharding` may belong to a
        different mesh than the one that saved (4 devices -> 2): Orbax reshards on read. The
        Grain iterator, if given, is set to the saved position in place. A damaged step raises
        `DamagedCheckpoint`.
        """
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        args = ocp.args.Composite(**items)
        restored = self._read(
            step, lambda: self.manager.restore(step, args=args), data=data_iterator is not None
        )
        return restored[STATE]

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None = None
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest step that reads back, or None when there is none. A
        damaged step is moved to `<step>.damaged` with one line saying what is wrong, and the
        previous one is tried (as a torn step is skipped)."""
        for step in reversed(self.all_steps()):
            reason = None
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except DamagedCheckpoint as error:
                reason = error.reason
            if jax.process_count() > 1:  # every process moves on together
                damaged = multihost_utils.process_allgather(np.int32(reason is not None))
                if reason is None and damaged.any():
                    reason = "damaged as another process reads it"
            if reason is None:
                console.say(f"resumed from step {step} ({self.directory})")
                return step, state
            _move_aside(self.directory / str(step), ".damaged")
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"bgjax.checkpoint.damaged.{step}")
            self.manager.reload()  # Orbax lists the step until told
            console.say(
                f"skipping damaged checkpoint {self.directory / str(step)} ({reason}): "
                f"moved to {step}.damaged"
            )
        return None

    def restore_partial(self, step: int, abstract_subtree: dict[str, Any]) -> dict[str, Any]:
        """Only the top-level entries of the saved state that `abstract_subtree` names (e.g.
        the params, not the optimizer state): for evaluation. A damaged step raises
        `DamagedCheckpoint` naming the other complete steps."""
        args = ocp.args.PyTreeRestore(
            abstract_subtree,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
            partial_restore=True,
        )

        def read():
            return _read_state(
                self.directory / str(step), lambda h, path: h.restore(path, args=args)
            )

        others = [s for s in self.all_steps() if s != step]
        hint = f"; other steps (--step): {', '.join(map(str, others))}" if others else ""
        return self._read(step, read, data=False, hint=hint)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._report_saved()

    def close(self) -> None:
        self.wait()
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
