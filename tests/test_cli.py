"""`bgjax <command> --help` / `-h`: exactly the command's own flags, with its own help texts.

What a command defines is read from its source (the `clflags.*` and `flags.DEFINE_*` calls), not
from the registry the help is printed from. Every command's help is taken in one subprocess
(each command imports JAX, seconds apiece); one more runs `bgjax train -h` end to end.
"""

import ast
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from bgjax import clflags
from bgjax.cli import COMMANDS

FLAGS_FOR_STEP = flags.FLAGS[clflags.checkpoint_step("step").name]

_CLFLAGS = {"string", "integer", "float_", "boolean", "string_list", "enum", "config_file"}
_CLFLAGS.add("checkpoint_step")
# Commands that take `--config.<key>=VALUE`: of their config file or of the run's saved config.
OVERRIDES = {"train", "sweep", "eval", "saliency", "adversarial"}

_ALL_HELPS = textwrap.dedent("""
    import contextlib, io, json, sys
    from bgjax import cli
    out = {}
    for name in cli.COMMANDS:
        for flag in ("--help", "-h"):
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                try:
                    cli.main(["bgjax", name, flag])
                    code = None
                except SystemExit as e:
                    code = e.code
            out[f"{name} {flag}"] = [code, text.getvalue()]
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
""")


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def defined_flags(command: str) -> dict[str, str]:
    """{flag name: help text} of the flag definitions in the command module's source."""
    source = open(importlib.util.find_spec(COMMANDS[command][0]).origin).read()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, fn = getattr(node.func.value, "id", None), node.func.attr
        if owner == "clflags" and fn in _CLFLAGS:
            define, help_key = getattr(clflags, fn), "help_"
        elif owner == "flags" and fn.startswith("DEFINE_"):
            define, help_key = getattr(flags, fn), "help"
        else:
            continue
        args = [_literal(a) for a in node.args]
        kwargs = {k.arg: _literal(k.value) for k in node.keywords}
        bound = inspect.signature(define).bind(*args, **kwargs)
        bound.apply_defaults()
        found[bound.arguments["name"]] = bound.arguments[help_key]
    return found


def _words(text: str) -> str:
    return " ".join(text.split())


def flag_blocks(text: str) -> dict[str, str]:
    """{flag name: its lines} of the help's flags section (the override line left out)."""
    blocks, name = {}, None
    for line in text.split("\nflags:\n", 1)[1].splitlines():
        if line.startswith("  --"):
            name = re.match(r"  --(?:\[no\])?(\S+)", line)[1]
            blocks[name] = ""
        if name is not None and line.startswith("  "):
            blocks[name] += line + "\n"
    blocks.pop("config.<key>=VALUE", None)
    return blocks


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    path = tmp_path_factory.mktemp("help") / "helps.json"
    subprocess.run([sys.executable, "-c", _ALL_HELPS, str(path)], check=True, timeout=300)
    return json.loads(path.read_text())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_lists_its_own_flags(helps, command):
    code, text = helps[f"{command} --help"]
    assert code == 0
    assert helps[f"{command} -h"] == [0, text]
    assert text.startswith(f"usage: bgjax {command}")
    assert _words(COMMANDS[command][1]) in _words(text)
    own = defined_flags(command)
    blocks = flag_blocks(text)
    assert set(blocks) == set(own)  # exactly its own flags: not absl's, not another command's
    for name, help_ in own.items():
        assert _words(help_) in _words(blocks[name]), name
    others = {h for c in COMMANDS if c != command for h in defined_flags(c).values()}
    for help_ in others - set(own.values()):  # e.g. demo's --workdir is not eval's
        assert _words(help_) not in _words(text)
    assert ("--config.<key>=VALUE" in text) == (command in OVERRIDES)


def test_demo_help_is_not_eval_help(helps):
    text = helps["demo --help"][1]
    assert "--workdir (string)" in text
    assert "Training workdir to evaluate" not in text and "all_steps" not in text


def test_train_help_end_to_end():
    cmd = [sys.executable, "-m", "bgjax.cli", "train", "--workdir", "/nonexistent", "-h"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    blocks = flag_blocks(result.stdout)
    assert "Directory for checkpoints, logs and config.json." in blocks["workdir"]
    assert "--config.<key>=VALUE" in result.stdout


def test_command_list_and_unknown_command():
    cli = [sys.executable, "-m", "bgjax.cli"]
    result = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(f"  {name} " in result.stdout for name in COMMANDS)
    result = subprocess.run([*cli, "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown command 'nope'" in result.stderr


@pytest.mark.parametrize(
    "given, parsed", [("best", "best"), ("latest", None), ("12", 12), (" Best ", "best")]
)
def test_step_flag_takes_a_number_best_or_latest(given, parsed):
    parser = FLAGS_FOR_STEP.parser
    assert parser.parse(given) == parsed


def test_step_flag_rejects_other_words():
    with pytest.raises(ValueError, match="expected a step number, 'best' or 'latest', got 'last'"):
        FLAGS_FOR_STEP.parser.parse("last")
