"""Scenarios a user runs into (issue #17, part A): a rerun with a bad or changed config leaves the
workdir as it was, user mistakes are one line, SIGTERM before the first step exits 0, the NaN
message is true, derived step counts follow overrides, every documented key can be set."""

import ast
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from bgjax import config_utils, lock, rerun, tasks, train, workdir
from bgjax.data import imagefiles

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic.py:size=tiny"  # the ConvNeXt smoke config: 32 px, batch 8


def _config(spec=TINY, **overrides):
    config = config_utils.load_config(spec)
    return config_utils.apply_overrides(config, {"progress_bar": False, **overrides})


def _files(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: a workdir's state, to compare before and after."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def _run(config, path, capsys) -> tuple[int, str]:
    """`bgjax train` in-process (train.run): exit status and its error line(s)."""
    capsys.readouterr()
    status = train.run(config, str(path))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, "\n".join(line for line in err.splitlines() if line.startswith("bgjax train"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-step tiny run (its checkpoint at step 2)."""
    path = tmp_path_factory.mktemp("finished") / "run"
    # Parameters sharded over the 4 test devices: Orbax then slices (and compiles a slice for)
    # far fewer replicated arrays when saving (28 compilations instead of 80).
    periods = {"eval.every_steps": 0, "checkpoint.every_steps": 2}
    config = _config(total_steps=2, mesh=[("data", 1), ("fsdp", 4)], **periods)
    assert not train.train(config, str(path))["preempted"]
    return path, config


def test_changed_rerun_is_refused_naming_the_keys_and_the_run_stays_usable(finished_run, capsys):
    path, config = finished_run
    before = _files(path)
    changes = {"model.masking": "early", "model.dims": (8, 16, 16, 64), "optimizer.wd": 0.5}
    changed = config_utils.apply_overrides(config, {**changes, "total_steps": 3})
    status, error = _run(changed, path, capsys)
    assert status == 2 and error.count("\n") == 0, error
    assert "model.masking: 'none' -> 'early'" in error and "optimizer.wd: 0.05 -> 0.5" in error
    assert "model.dims: [8, 16, 16, 32] -> [8, 16, 16, 64]" in error  # another architecture
    assert "total_steps:" not in error  # safe on resume: not named
    assert _files(path) == before  # config.json untouched, no failed.txt, no lock left
    run = workdir.restore(str(path))  # what `bgjax eval` does first
    assert run.step == 2 and run.config.model.masking == "none"


def test_rerun_on_other_data_is_refused(finished_run):
    path, config = finished_run
    moved = config_utils.apply_overrides(config, {"data.seed": 1})  # other images, same classes
    info = workdir.read_info(path)
    with pytest.raises(rerun.ConfigChanged, match="data.seed: 0 -> 1"):
        rerun.check_same_config(path, moved, info)
    other = dataclasses.replace(info, class_names=tuple(reversed(info.class_names)))
    with pytest.raises(rerun.ConfigChanged, match=r"dataset_info.json:class_names: \["):
        rerun.check_same_config(path, config, other)
    assert rerun.check_same_config(path, config, info) == {}


@pytest.mark.parametrize(
    "key, value",
    [("model.masking", "bogus"), ("train_variant", "bogus"), ("optimizer.wd_params", "bogus")],
)
def test_bad_choice_is_one_line_and_touches_nothing(finished_run, tmp_path, key, value, capsys):
    path, config = finished_run
    bad = config_utils.apply_overrides(config, {key: value})
    before = _files(path)
    for target in (path, tmp_path / "fresh"):
        status, error = _run(bad, target, capsys)
        assert status == 2 and f"config.{key}='bogus': expected one of" in error, error
    assert _files(path) == before
    assert not (tmp_path / "fresh").exists()


def test_workdir_naming_a_file_is_one_line(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for target in (file, file / "run"):
        status, error = _run(_config(), target, capsys)
        assert status == 2 and f"{file} is a file, not a directory" in error, error
    assert file.read_text() == "mine"


@pytest.mark.parametrize("root", ["missing", "empty"])
def test_missing_or_empty_dataset_root_is_one_line(tmp_path, root, capsys):
    (tmp_path / "empty").mkdir()
    config = _config("cub.py:arch=convnext,size=tiny", **{"data.root": str(tmp_path / root)})
    status, error = _run(config, tmp_path / "run", capsys)
    assert status == 2 and str(tmp_path / root) in error, error
    assert not (tmp_path / "run").exists()


def test_missing_init_weights_are_one_line(tmp_path, capsys):
    config = _config(**{"model.init": str(tmp_path / "convnext.safetensors")})
    status, error = _run(config, tmp_path / "run", capsys)
    assert status == 2 and f"config.model.init: {tmp_path / 'convnext.safetensors'}" in error
    assert not (tmp_path / "run").exists()


def test_sigterm_while_preparing_stops_with_nothing_to_save(tmp_path, monkeypatch, capsys):
    check = rerun.check_same_config

    def check_then_preempt(*args, **kwargs):  # SIGTERM arrives while the run is being checked
        os.kill(os.getpid(), signal.SIGTERM)
        return check(*args, **kwargs)

    monkeypatch.setattr(rerun, "check_same_config", check_then_preempt)
    summary = train.train(_config(), str(tmp_path / "run"))
    assert summary == {"preempted": True, "step": 0}
    assert "before step 1: nothing to save (no checkpoint yet)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the watcher put it back


def test_sigterm_while_resuming_stops_before_the_next_step(finished_run, monkeypatch, capsys):
    path, config = finished_run
    write = workdir.write_run_files

    def write_then_preempt(*args, **kwargs):  # SIGTERM once the workdir is locked and written
        write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(workdir, "write_run_files", write_then_preempt)
    longer = config_utils.apply_overrides(config, {"total_steps": 3})  # safe on resume
    assert train.train(longer, str(path)) == {"preempted": True, "step": 2}
    out = capsys.readouterr().out
    assert "preempted before step 3: nothing to save (checkpoint step 2 is the latest)" in out
    assert workdir.latest_step(path) == 2 and not (path / lock.LOCK_FILE).exists()
    assert workdir.read_config(path).total_steps == 3  # the allowed change is recorded


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler yet (/proc: the SigCgt bit mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_sigterm_right_after_start_exits_0_with_a_message(tmp_path):
    cmd = [sys.executable, "-m", "bgjax.cli", "train", f"--config={TINY}"]
    proc = subprocess.Popen(
        [*cmd, f"--workdir={tmp_path / 'run'}", "--noconfig.progress_bar"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "nothing to save" in output and "Traceback" not in output, output
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


class _Checkpoints:
    """What `train._after_nan` reads of a Checkpointer."""

    def __init__(self, latest):
        self.latest, self.directory = latest, Path("/runs/x/checkpoints")

    def wait(self):
        pass

    def latest_step(self):
        return self.latest


@pytest.mark.parametrize("latest", [None, 40])
@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_nan_advice_is_true_to_the_checkpoints_and_clipping(latest, clip_norm):
    config = _config(**{"optimizer.clip_norm": clip_norm})
    advice = train._after_nan(config, _Checkpoints(latest))
    assert ("kept" in advice) == (latest is not None)
    assert ("step 40" in advice) == (latest == 40)
    assert ("enable clipping" in advice) == (clip_norm == 0)
    assert "\n" not in advice


def test_nan_on_a_fresh_run_says_no_checkpoint_exists(tmp_path, capsys):
    config = _config(**{"optimizer.lr": float("nan"), "eval.every_steps": 0})
    status, error = _run(config, tmp_path / "run", capsys)
    assert status == 2 and "at step 1" in error, error
    assert "No checkpoint was saved yet" in error and "is kept" not in error
    assert "enable clipping" not in error and "clip_norm (now 1)" in error  # clipping is on
    assert (tmp_path / "run" / lock.FAILED_FILE).exists()


def _train_flags(spec: str, *overrides: str):
    """A config as `bgjax train` parses it: override keys checked, then config_flags applies
    the `--config.<key>=value` overrides (a fresh FlagValues: the global one stays as it was)."""
    overrides = [f"--config.{o}" for o in overrides]
    config_utils.check_override_keys(config_utils.load_config(spec), overrides)
    argv = ["train", f"--config={config_utils.resolve_config(spec)}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("apply", ["command line", "sweep"])
def test_batch_size_override_rescales_the_epoch_recipe(apply):
    def load(spec, *overrides):
        if apply == "command line":
            return _train_flags(spec, *overrides)
        pairs = dict(o.split("=", 1) for o in overrides)
        return config_utils.apply_overrides(config_utils.load_config(spec), pairs)

    cnn, vit = "cub.py:arch=convnext,size=base", "cub.py:arch=vit,size=base"
    base, doubled = load(cnn), load(cnn, "batch_size=128")
    assert base.total_steps == 2622 and doubled.total_steps == 1311  # 28 epochs of 5,994
    assert doubled.checkpoint.every_steps < base.checkpoint.every_steps
    warm, warm2 = load(vit).optimizer.warmup_steps, load(vit, "batch_size=128").optimizer
    assert abs(2 * warm2.warmup_steps - warm) <= 1 and warm > 0  # 20 warm-up epochs
    assert load(cnn, "batch_size=128", "total_steps=500").total_steps == 500  # explicit wins
    assert load(cnn, "epochs=14.0").total_steps == 1311
    wb = load("waterbirds.py", "batch_size=128")
    assert wb.total_steps == round(100 * 4795 / 128) and wb.optimizer.warmup_steps > 0


# Keys named in README.md and the config files' docstrings: `--config.k=v`, `config.k`,
# `group.k=v` (group: a config group); file names (`augment.py`, `config.json`) are not keys.
_GROUPS = "data|model|optimizer|loss|eval|checkpoint|augment"
_KEY = re.compile(
    rf"(?<![\w./-])(?:--)?(?:config\.)?((?:{_GROUPS})\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    rf"|(?<![\w./-])(?:--)?config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
)
_VALUE = re.compile(r"""=("[^"]*"|'[^']*'|[^\s,`)\]]+)""")
_NOT_KEYS = ("py", "md", "json", "jsonl", "png", "csv", "txt")


def _loads(spec: str) -> bool:
    try:
        config_utils.load_config(spec)
    except ValueError:  # an arch the config does not offer
        return False
    return True


# Each packaged training config, under every arch it offers (and the segmenter's datasets).
_TRAINING_CONFIGS = [
    spec
    for name, args in [
        ("synthetic.py", [""]),
        ("in9.py", [""]),
        ("cub.py", [""]),
        ("waterbirds.py", [""]),
        ("segmenter.py", ["dataset=synthetic,", "dataset=cub,", "dataset=in9,"]),
    ]
    for arg in args
    for arch in ("convnext", "vit", "resnet")
    if _loads(spec := f"{name}:{arg}arch={arch}")
]


def documented_keys() -> list[tuple[str, str, str | None, list[str]]]:
    """(where, key, value given or None, configs it should be settable on)."""
    texts = {"README.md": ((REPO / "README.md").read_text(), _TRAINING_CONFIGS)}
    for path in sorted(config_utils.CONFIGS_DIR.glob("*.py")):
        if path.name != "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            texts[path.name] = (doc, [c for c in _TRAINING_CONFIGS if c.startswith(path.name)])
    found = {}
    for where, (text, configs) in texts.items():
        for match in _KEY.finditer(text):
            key = (match[1] or match[2]).rstrip(".")
            if key.rsplit(".", 1)[-1] in _NOT_KEYS:
                continue
            value = _VALUE.match(text, match.end())
            value = value[1].strip("\"'") if value else None
            found.setdefault((where, key, value), configs)
    return [(*k, v) for k, v in found.items()]


def test_documented_keys_are_found():
    keys = {key for _, key, _, _ in documented_keys()}
    assert {"batch_size", "model.head_pool", "model.late_stage", "data.root"} <= keys, keys


@pytest.mark.parametrize(
    "where, key, value, configs", documented_keys(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_documented_key_is_settable(where, key, value, configs):
    errors = []
    for spec in configs:
        config = config_utils.load_config(spec)
        try:
            config_utils.check_override_keys(config, [f"--config.{key}=x"])
            if value is not None:  # the documented value is of the key's type and valid
                config = config_utils.apply_overrides(config, {key: value})
                flat = config_utils.flatten(config)
                if key in train.CHOICES:
                    train._check_choice(key, flat[key], train.CHOICES[key])
            return
        except (ValueError, TypeError) as error:
            errors.append(f"{spec}: {str(error)[:120]}")
    pytest.fail(f"{where} names config.{key}, settable on none of {configs}: {errors}")


@pytest.mark.parametrize("spec", ["cub.py", "waterbirds.py", "segmenter.py:dataset=cub"])
def test_skip_corrupt_is_settable_on_real_data(spec):
    assert _train_flags(spec, "data.skip_corrupt=True").data.skip_corrupt is True


@pytest.mark.parametrize(
    "arch, option, value", [("convnext", "late_stage", 4), ("vit", "late_block", -2),
                            ("vit", "head_pool", "gap")]
)  # fmt: skip
def test_model_options_reach_the_model(arch, option, value):
    spec = f"synthetic.py:arch={arch},size=tiny,strategy=late"
    config = _train_flags(spec, f"model.{option}={value}")
    if arch == "vit":
        config.model.depth = 2  # late_block=-2 needs two blocks
    model = nnx.eval_shape(lambda: tasks.make_model(config, num_classes=4))
    assert getattr(model, option) == value


def test_corrupt_image_error_names_skip_corrupt():
    with pytest.raises(imagefiles.CorruptImageError, match=r"bad\.jpg.*data\.skip_corrupt=True"):
        imagefiles.decode_rgb(b"not an image", "bad.jpg")
