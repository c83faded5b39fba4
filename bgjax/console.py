"""What a command prints: a progress bar and bgjax's own one-line messages (resumed from step N,
saved step N, skipped damaged step N, new best); the libraries' logs only with `--verbosity`.

absl's `app.run` raises the log level to INFO when `--verbosity` is not given, and Orbax alone
then writes about 40 INFO lines per checkpoint save, cutting through the progress bar.
`quiet_libraries()` (called by `bgjax.cli` before `app.run`) keeps them at WARNING unless the
user asked (`--verbosity=0` or `-v 0` brings them back).
"""

from __future__ import annotations

import logging as py_logging

import tqdm
from absl import app, flags
from absl import logging as absl_logging


def say(message: str) -> None:
    """One line on stdout from the main process, printed above any progress bar."""
    import jax  # here: bgjax.cli imports this module before JAX may be imported (hostmem)

    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def _warnings_only_unless_asked() -> None:
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def quiet_libraries() -> None:
    """Library logs (Orbax, Grain, JAX, etils: all through the root logger) at WARNING, once
    absl has parsed the flags, unless `--verbosity` was given."""
    app.call_after_init(_warnings_only_unless_asked)


class DropMessages(py_logging.Filter):
    """Drops log records whose message starts with one of `prefixes` (a library's notice about
    a choice bgjax made on purpose, e.g. Orbax's "Given directory is read only")."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: py_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)
