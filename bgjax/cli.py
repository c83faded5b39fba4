"""`bgjax <command> [flags]`: one entry point that hands the rest of argv to the command's module.

Each command lives in its own module, defines its own absl flags at import time and exposes
`main(argv)`. Only the chosen module is imported, so commands can reuse flag names (`--workdir`,
`--config`) without clashing. Everything runs under `absl.app.run`, which Grain's spawned worker
processes need (they read absl flags; see REFERENCE.md §6).
"""

from __future__ import annotations

import importlib
import sys

from absl import app

from bgjax import hostmem

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
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bgjax <command> [flags]   (bgjax <command> --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"bgjax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    hostmem.keep_freed_memory()  # before the command imports JAX and it starts its threads
    module = importlib.import_module(COMMANDS[name][0])
    # A command may bring its own flags parser (train: clear errors for unknown config keys).
    parser = getattr(module, "flags_parser", app.parse_flags_with_usage)
    app.run(module.main, argv=[f"bgjax {name}", *argv[2:]], flags_parser=parser)


if __name__ == "__main__":
    run()
