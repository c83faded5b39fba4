"""Idempotent absl flag definitions shared by the command modules.

Each `bgjax <command>` module defines its flags at import (big_vision style). Several commands use
the same names (`--workdir`, `--config`, `--seed`), and tests or `bgjax demo` import more than one
command module into one process, so a flag is defined once and later definitions reuse it.
Definitions that disagree on type are a programming error and raise.

Because a flag object is shared, its help text is its first definer's. So each definition is
also recorded under the calling module, with that module's own help text and default:
`module_flags` is what `bgjax <command> --help` lists.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from bgjax import config_utils

FLAGS = flags.FLAGS
# absl then files the flags defined here under the calling module (in --helpfull), not this one.
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class Spec:
    """One module's definition of a flag, as its --help shows it."""

    name: str
    kind: str  # string, integer, float, bool, list, enum, config file
    default: Any
    help: str
    choices: tuple[str, ...] = ()


_DEFINED: dict[str, dict[str, Spec]] = {}  # module name -> flag name -> its definition there


def module_flags(module: str) -> list[Spec]:
    """The flags `module` defines, in definition order, with its own help texts and defaults;
    plain absl `flags.DEFINE_*` calls in it included."""
    specs = dict(_DEFINED.get(module, {}))
    for flag in FLAGS.flags_by_module_dict().get(module, []):
        parser = flag.parser
        kind = "bool" if isinstance(flag, flags.BooleanFlag) else flag.flag_type()
        choices = tuple(getattr(parser, "enum_values", None) or ())
        specs.setdefault(flag.name, Spec(flag.name, kind, flag.default, flag.help or "", choices))
    return list(specs.values())


def _existing(name: str, kind: type):
    if name not in FLAGS:
        return None
    flag = FLAGS[name]
    if kind is not None and not isinstance(flag, kind):
        raise TypeError(f"flag --{name} is already defined as {type(flag).__name__}")
    return flags.FlagHolder(FLAGS, flag)


def _define(define, kind, name, default, help_, *args, choices=(), **kwargs):
    # Frame 2 is the module that called string(), integer(), ...
    module = sys._getframe(2).f_globals.get("__name__", "?")
    _DEFINED.setdefault(module, {})[name] = Spec(name, kind, default, help_, tuple(choices))
    holder = _existing(name, flags.Flag)
    return define(name, default, *args, help_, **kwargs) if holder is None else holder


def string(name: str, default: str | None, help_: str):
    return _define(flags.DEFINE_string, "string", name, default, help_)


def integer(name: str, default: int | None, help_: str):
    return _define(flags.DEFINE_integer, "integer", name, default, help_)


def float_(name: str, default: float | None, help_: str):
    return _define(flags.DEFINE_float, "float", name, default, help_)


def boolean(name: str, default: bool | None, help_: str):
    return _define(flags.DEFINE_bool, "bool", name, default, help_)


def string_list(name: str, default: list[str] | None, help_: str):
    return _define(flags.DEFINE_list, "list", name, default, help_)


class _StepParser(flags.ArgumentParser):
    """A checkpoint step: N, "best" (by the run's checkpoint.best_metric) or "latest" (None)."""

    def parse(self, argument):
        if argument is None or isinstance(argument, int):
            return argument
        text = str(argument).strip().lower()
        if text in ("best", "latest"):
            return "best" if text == "best" else None
        try:
            return int(text)
        except ValueError:
            raise ValueError(
                f"expected a step number, 'best' or 'latest', got {argument!r}"
            ) from None

    def flag_type(self):
        return "step"


def checkpoint_step(
    name: str = "step", help_: str = "Checkpoint step: N, best or latest (default: the latest)."
):
    """`--step N | best | latest`; the value is an int, "best" or None (latest)."""

    def define(name, default, help_):
        return flags.DEFINE(
            _StepParser(), name, default, help_, serializer=flags.ArgumentSerializer()
        )

    return _define(define, "step", name, None, help_)


class _ConfigFileParser(flags.ArgumentParser):
    """config_flags' file parser, also taking a packaged config name (`synthetic.py:arg`)."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument):
        try:
            argument = config_utils.resolve_config(argument)
        except FileNotFoundError as e:  # absl reports a ValueError as a bad flag value
            raise ValueError(str(e)) from None
        return self._parser.parse(argument)

    def flag_type(self):
        return self._parser.flag_type()


def config_file(name: str = "config", help_: str = "experiment config file, e.g. cfg.py:arg"):
    """`--config file.py[:arg]` (a path or a packaged name, see `config_utils.resolve_config`)
    with `--config.key=value` overrides (unknown keys are errors)."""
    holder = _define(
        config_flags.DEFINE_config_file, "config file", name, None, help_, lock_config=True
    )
    flag = FLAGS[name]
    if not isinstance(flag.parser, _ConfigFileParser):
        flag.parser = _ConfigFileParser(flag.parser)
    return holder


def enum(name: str, default: str | None, values: list[str], help_: str):
    return _define(flags.DEFINE_enum, "enum", name, default, help_, values, choices=values)
