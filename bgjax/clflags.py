"""Idempotent absl flag definitions shared by the command modules.

Each `bgjax <command>` module defines its flags at import (big_vision style). Several commands use
the same names (`--workdir`, `--config`, `--seed`), and tests or `bgjax demo` import more than one
command module into one process, so a flag is defined once and later definitions reuse it.
Definitions that disagree on type are a programming error and raise.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _existing(name: str, kind: type):
    if name not in FLAGS:
        return None
    flag = FLAGS[name]
    if kind is not None and not isinstance(flag, kind):
        raise TypeError(f"flag --{name} is already defined as {type(flag).__name__}")
    return flags.FlagHolder(FLAGS, flag)


def _define(define, name, *args, **kwargs):
    holder = _existing(name, flags.Flag)
    return define(name, *args, **kwargs) if holder is None else holder


def string(name: str, default: str | None, help_: str):
    return _define(flags.DEFINE_string, name, default, help_)


def integer(name: str, default: int | None, help_: str):
    return _define(flags.DEFINE_integer, name, default, help_)


def float_(name: str, default: float | None, help_: str):
    return _define(flags.DEFINE_float, name, default, help_)


def boolean(name: str, default: bool | None, help_: str):
    return _define(flags.DEFINE_bool, name, default, help_)


def string_list(name: str, default: list[str] | None, help_: str):
    return _define(flags.DEFINE_list, name, default, help_)


def config_file(name: str = "config", help_: str = "experiment config file, e.g. cfg.py:arg"):
    """`--config path.py[:arg]` with `--config.key=value` overrides (unknown keys are errors)."""
    return _define(config_flags.DEFINE_config_file, name, None, help_, lock_config=True)


def enum(name: str, default: str | None, values: list[str], help_: str):
    return _define(flags.DEFINE_enum, name, default, values, help_)
