"""The packaged configs load, validate and build their models; bad args / override keys are clear
errors; `--config` takes a path or a packaged name."""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from flax import nnx

from bgjax import (
    config_utils,
    models,
    optim,
    tasks,
    train,  # noqa: F401  (defines `bgjax train`'s --config flag)
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = config_utils.CONFIGS_DIR

ARGS = {
    "synthetic.py": ["", "size=tiny", "arch=vit,strategy=late,size=tiny", "strategy=mixed_rand",
                     "arch=vit,strategy=attn", "size=base,frozen=True"],
    "in9.py": ["", "size=tiny", "arch=vit,variant=mixed_rand", "subset=in9,masking=early"],
    "cub.py": ["", "size=tiny", "arch=convnext,size=large,strategy=late",
               "arch=vit,size=small,strategy=early,mode=frozen"],
    "waterbirds.py": ["", "size=tiny", "arch=vit,strategy=attn,label=species,mode=frozen"],
}  # fmt: skip


def _cases():
    return [(name, arg) for name, args in ARGS.items() for arg in args]


@pytest.mark.parametrize("name, arg", _cases())
def test_config_is_complete_and_consistent(name, arg):
    config = config_utils.load_config(f"{CONFIGS / name}:{arg}" if arg else CONFIGS / name)
    reference = config_utils.base_config()
    assert set(reference) <= set(config), set(reference) - set(config)
    assert config.model.name in models.names()
    assert config.total_steps > config.optimizer.warmup_steps >= 0
    assert config.model.masking in ("none", "early", "late", "attn")
    optim.make(config.optimizer, config.total_steps)  # the schedule / optimizer build
    if "size=tiny" in arg:
        assert config.data.image_size == 32 and config.total_steps <= 10


@pytest.mark.parametrize("arch", ["convnext", "vit"])
def test_tiny_models_build_with_their_config_overrides(arch):
    config = config_utils.load_config(f"{CONFIGS / 'cub.py'}:arch={arch},size=tiny,strategy=late")
    model = nnx.eval_shape(lambda: tasks.make_model(config, num_classes=200))
    assert model.masking == "late"
    n_params = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params < 200_000


def test_paper_recipes():
    vit = config_utils.load_config(f"{CONFIGS / 'cub.py'}:arch=vit,size=base")
    assert vit.model.name == "vit_base_patch14_dinov2" and vit.data.image_size == 518
    assert (vit.optimizer.lr, vit.optimizer.head_lr_mult, vit.loss.mixup_alpha) == (
        4e-6,
        1000.0,
        0.8,
    )
    frozen = config_utils.load_config(f"{CONFIGS / 'cub.py'}:arch=vit,mode=frozen")
    assert frozen.model.frozen_backbone and frozen.optimizer.lr == 1e-3
    cnn = config_utils.load_config(f"{CONFIGS / 'cub.py'}:arch=convnext")
    assert (cnn.data.image_size, cnn.optimizer.head_lr_mult) == (224, 100.0)
    mixed = config_utils.load_config(f"{CONFIGS / 'in9.py'}:variant=mixed_rand")
    assert mixed.train_variant == "mixed_rand" and mixed.eval.data.name == "in9"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic.py:size=huge", "expected one of"),
        ("synthetic.py:colour=red", "unknown config arg 'colour'"),
        ("synthetic.py:frozen=maybe", "expected a boolean"),
        ("synthetic.py:size", "key=value"),
        ("synthetic.py:strategy=attn", "needs arch=vit"),
        ("cub.py:arch=convnext,strategy=attn", "expected one of"),
    ],
)
def test_bad_config_args(spec, message):
    with pytest.raises(ValueError, match=message):
        config_utils.load_config(CONFIGS / spec)


def test_override_key_check():
    config = config_utils.load_config(f"{CONFIGS / 'synthetic.py'}:size=tiny")
    config_utils.check_override_keys(
        config, ["--config.optimizer.lr=0.1", "--noconfig.progress_bar"]
    )
    with pytest.raises(ValueError, match=r"'optimizer.lrr'.*config.optimizer has no key 'lrr'"):
        config_utils.check_override_keys(config, ["--config.optimizer.lrr=0.1"])
    with pytest.raises(ValueError, match="config.augment is None"):
        config_utils.check_override_keys(config, ["--config.augment.flip=True"])


def test_unknown_override_key_is_a_clear_command_line_error(tmp_path):
    cmd = [sys.executable, "-m", "bgjax.train", f"--config={CONFIGS / 'synthetic.py'}:size=tiny"]
    cmd += [f"--workdir={tmp_path}", "--config.optimizer.learning_rate=0.1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "unknown config key 'optimizer.learning_rate'" in last and "lr" in last, done.stderr
    assert not (tmp_path / "config.json").exists()


def test_config_names_resolve_to_packaged_files(tmp_path, monkeypatch):
    assert {"synthetic.py", "cub.py", "sweeps/synthetic_tiny.py"} <= set(
        config_utils.packaged_configs()
    )
    packaged = f"{CONFIGS / 'synthetic.py'}:size=tiny"
    assert config_utils.resolve_config("synthetic.py:size=tiny") == packaged
    assert config_utils.resolve_config("configs/synthetic.py:size=tiny") == packaged  # old name
    assert config_utils.resolve_config(packaged) == packaged
    tiny_sweep = config_utils.resolve_config("sweeps/synthetic_tiny.py")
    assert tiny_sweep == str(CONFIGS / "sweeps" / "synthetic_tiny.py")
    with pytest.raises(FileNotFoundError, match=r"'nosuch.py'.*packaged: cub.py, in9.py"):
        config_utils.load_config("nosuch.py:size=tiny")
    # A file of that name in the working directory comes before the packaged one.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic.py").write_text("def get_config(arg):\n    return {'mine': arg}\n")
    assert config_utils.load_config("synthetic.py:x") == {"mine": "x"}


def test_config_flag_takes_packaged_names():
    parser = flags.FLAGS["config"].parser  # `bgjax train --config` (bgjax.clflags.config_file)
    assert parser.parse("synthetic.py:size=tiny").total_steps == 6
    with pytest.raises(ValueError, match="packaged: cub.py"):
        parser.parse("nosuch.py")
