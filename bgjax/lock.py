"""One trainer per run: DIR/train.lock names the trainer (host, pid, since) while it runs, and
DIR/failed.txt says why the last attempt stopped with an error (`bgjax sweep --status` reads
both through `bgjax.workdir.run_state`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

LOCK_FILE = "train.lock"
FAILED_FILE = "failed.txt"


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the run's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def holder(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """{"host", "pid", "since"} of the lock's holder, or None when the run is not locked."""
    path = epath.Path(workdir) / LOCK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, ValueError):  # torn by a crash while writing it
        return {"host": "?", "pid": -1, "since": "?"}


def holder_alive(who: Mapping[str, Any]) -> bool | None:
    """True / False for a holder on this host; None (unknown) for another host's."""
    if who.get("host") != socket.gethostname():
        return None
    return int(who.get("pid", -1)) > 0 and _pid_alive(int(who["pid"]))


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, stale: str = "checkpoints/*orbax-checkpoint-tmp*"):
    """Hold `workdir`'s trainer lock (DIR/train.lock: host, pid, since) while training.

    A second trainer refuses at once, naming the holder. A lock left by a dead process of this
    host is taken over, with a message; one from another host is only reported (its process
    cannot be checked from here: delete the file if it is gone). Stale Orbax temporary folders
    (the `stale` glob) are removed once the lock is ours. Only local filesystems are locked (a
    gs:// workdir is trained unlocked: object stores have no exclusive create)."""
    if "://" in os.fspath(workdir):
        logging.warning("%s is not on a local filesystem: training without a workdir lock", workdir)
        yield
        return
    workdir = epath.Path(workdir)
    created = not workdir.exists()  # removed again if the run never wrote anything
    workdir.mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            other = holder(workdir) or {}
            alive = holder_alive(other)
            who = f"pid {other.get('pid')} on {other.get('host')} since {other.get('since')}"
            if alive is False or other.get("pid") == -1:
                logging.warning("%s: taking over the lock of a dead trainer (%s)", workdir, who)
                os.remove(path)
                continue
            hint = "" if alive else f"; if that process is gone, delete {path}"
            raise WorkdirLocked(f"{workdir} is being trained by {who}{hint}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # the dead holder's lock came back between removing and taking it: a new trainer
        raise WorkdirLocked(f"{workdir} is being trained by another process (lock {path})")
    try:
        for tmp in workdir.glob(stale):
            logging.warning("removing %s, left by an interrupted save", tmp)
            tmp.rmtree() if tmp.is_dir() else tmp.unlink()
        yield
    finally:
        if (holder(workdir) or {}).get("pid") == me["pid"]:
            os.remove(path)
        if created and not any(workdir.iterdir()):  # e.g. the config failed its checks
            workdir.rmdir()


def record_failure(workdir: str | os.PathLike, error: BaseException | None) -> None:
    """Note why training stopped with an error (DIR/failed.txt), or clear the note (None).
    Only a run that got as far as writing its files is noted: an error before that (a bad
    config, a missing dataset) leaves the workdir as it was."""
    path = epath.Path(workdir) / FAILED_FILE
    if error is not None and not any(
        p.name not in (LOCK_FILE, FAILED_FILE) for p in epath.Path(workdir).iterdir()
    ):
        return
    if error is None:
        if path.exists():
            path.unlink()
        return
    line = f"{type(error).__name__}: {error}".splitlines()[0]
    path.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
