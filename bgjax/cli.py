"""`bgjax <command> [flags]`: one entry point that hands the rest of argv to the command's module.

Each command lives in its own module, defines its own absl flags at import time and exposes
`main(argv)`. Only the chosen module is imported, so commands can reuse flag names (`--workdir`,
`--config`) without clashing. `bgjax <command> --help` (or `-h`) lists the flags that command's
module defines (`clflags.module_flags`), not absl's nor those of modules it imports; `--helpfull`
is absl's list of every flag. Everything runs under `absl.app.run`, which Grain's spawned worker
processes need (they read absl flags; see docs/reference.md#grain-workers).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import signal
import sys
import textwrap

from absl import app

from bgjax import clflags, config_utils, console, hostmem

# command name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bgjax.demo", "reproduce both papers' findings on the synthetic dataset"),
    "train": ("bgjax.train", "train a model from a config file"),
    "eval": ("bgjax.evaluate", "evaluate checkpoints on background variants"),
    "adversarial": ("bgjax.analysis.adversarial", "adversarial-background search"),
    "saliency": ("bgjax.analysis.saliency", "Grad-CAM / input-gradient saliency"),
    "compare": ("bgjax.analysis.compare", "compare several evaluated workdirs"),
    "show-variants": ("bgjax.show_variants", "write a grid picture of the eight variants"),
    "convert": ("bgjax.models.convert", "import timm weights (safetensors/.pth)"),
    "prepare": ("bgjax.data.prepare", "write a real dataset as TFDS array_record"),
    "sweep": ("bgjax.sweep", "run or print a grid of training runs"),
    "aggregate": ("bgjax.aggregate", "evaluate and tabulate a sweep"),
    "dfr": ("bgjax.dfr", "re-train a run's last layer on group-balanced held-out data (DFR)"),
}


# Commands whose SIGTERM (a preemption) means "stop cleanly": one that arrives while nothing can
# be saved (importing, setting up) ends them with a message and exit status 0.
STOPS_ON_SIGTERM = ("train",)


def _stop_on_sigterm(name: str, signum: int, frame) -> None:
    del signum, frame
    print(f"bgjax {name}: SIGTERM before training started: nothing to save", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not SystemExit: raised in the middle of importing JAX's C extensions (or with its threads
    # half started) the interpreter's shutdown can crash (SIGSEGV). Nothing is on disk yet: the
    # trainer takes over SIGTERM before it locks or writes the workdir.
    os._exit(0)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bgjax <command> [flags]   (bgjax <command> --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


_HELP = ("-h", "--help", "--helpshort")


def _wants_help(args: list[str]) -> bool:
    """-h / --help anywhere among the command's flags (absl's own would print no flags)."""
    for arg in args:
        if arg == "--":  # what follows is positional
            return False
        if arg in _HELP:
            return True
    return False


def _usage_line(name: str, doc: str, has_flags: bool) -> str:
    # A module docstring opening with "`bgjax NAME ARGS`:" names its positional arguments.
    match = re.match(rf"`(bgjax {re.escape(name)}\b[^`]*)`", doc.lstrip())
    usage = match[1] if match else f"bgjax {name}"
    return usage + " [flags]" if has_flags else usage


def _examples(name: str, doc: str) -> list[str]:
    """The docstring's indented `bgjax NAME ...` lines, with their deeper-indented continuations."""
    lines, indent = [], None
    for line in doc.splitlines():
        depth, text = len(line) - len(line.lstrip()), line.strip()
        if depth and re.match(rf"bgjax {re.escape(name)}(\s|$)", text):
            lines.append(line)
            indent = depth
        elif indent is not None and text and depth > indent:
            lines.append(line)
        else:
            indent = None
    return textwrap.indent(textwrap.dedent("\n".join(lines)), "  ").splitlines()


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(
        text,
        100,
        initial_indent=" " * 6,
        subsequent_indent=" " * 6,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _describe(spec: clflags.Spec) -> list[str]:
    name = f"[no]{spec.name}" if spec.kind == "bool" else spec.name
    kind = f"one of {'|'.join(spec.choices)}" if spec.choices else spec.kind
    if spec.default is not None:
        default = spec.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        elif isinstance(default, str):
            default = repr(default)
        kind += f"; default: {default}"
    return [f"  --{name} ({kind})", *_wrap(spec.help)]


def _override_help(module, specs: list[clflags.Spec]) -> list[str]:
    """The `--config.<key>=VALUE` line of a command that takes config overrides."""
    configs = [spec.name for spec in specs if spec.kind == "config file"]
    if configs:
        what = f"the --{configs[0]} file"
    elif getattr(module, "flags_parser", None) is config_utils.parse_flags_with_overrides:
        what = "the run's saved config"
    else:
        return []
    key = configs[0] if configs else "config"
    return [f"  --{key}.<key>=VALUE", *_wrap(f"set one key of {what} (repeatable)")]


def command_help(name: str) -> str:
    """`bgjax NAME --help`: usage, what the command does and the flags its module defines, each
    with that module's help text (another module may have defined the same flag first)."""
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    doc, specs = module.__doc__ or "", clflags.module_flags(module_name)
    lines = [f"usage: {_usage_line(name, doc, bool(specs))}", "", summary]
    examples = _examples(name, doc)
    if examples:
        lines += ["", "examples:", *examples]
    lines += ["", "flags:"]
    for spec in specs:
        lines += _describe(spec)
    lines += _override_help(module, specs)
    if not specs:
        lines.append("  (none of its own)")
    lines += ["", f"absl's flags (--verbosity, ...) and all others: bgjax {name} --helpfull"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 2 and argv[1] == "help":  # `bgjax help train` = `bgjax train --help`
        argv = [argv[0], argv[2], "--help"]
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"bgjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    if _wants_help(argv[2:]):
        print(command_help(name))
        sys.exit(0)
    hostmem.keep_freed_memory()  # before the command imports JAX and it starts its threads
    console.quiet_libraries()  # library logs only with --verbosity
    if name in STOPS_ON_SIGTERM:  # until the trainer watches SIGTERM itself (after imports)
        signal.signal(signal.SIGTERM, functools.partial(_stop_on_sigterm, name))
    module = importlib.import_module(COMMANDS[name][0])
    # A command may bring its own flags parser (train: clear errors for unknown config keys).
    parser = getattr(module, "flags_parser", app.parse_flags_with_usage)
    app.run(module.main, argv=[f"bgjax {name}", *argv[2:]], flags_parser=parser)


if __name__ == "__main__":
    main()
