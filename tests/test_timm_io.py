"""Weights in and out in timm's format: timm_io and the `bgjax convert` command."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from parity_utils import random_images, randomize_torch_model, state_dict_numpy, timm_model
from safetensors.numpy import load_file, save_file

from bgjax import models
from bgjax.models import convert, timm_io

pytestmark = pytest.mark.parity  # every test here starts from a timm model

ARCH = "convnext_atto"
NUM_CLASSES = 10
# A small conv_mlp=False layout for the tests that need freshly initialised heads.
SMALL = dict(depths=(1, 1, 1, 1), dims=(16, 16, 16, 16))


@pytest.fixture(scope="module")
def timm_atto():
    return randomize_torch_model(timm_model(ARCH, num_classes=NUM_CLASSES), seed=3)


@pytest.fixture(scope="module")
def weights(timm_atto, tmp_path_factory):
    """The randomised atto as a state dict, a .safetensors file and a .pth file."""
    import torch

    root = tmp_path_factory.mktemp("weights")
    state_dict = state_dict_numpy(timm_atto)
    save_file(state_dict, str(root / "atto.safetensors"))
    torch.save(timm_atto.state_dict(), root / "atto.pth")
    return state_dict, root / "atto.safetensors", root / "atto.pth"


def _assert_same_tensors(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_round_trip_through_timm(timm_atto, weights, tmp_path):
    import torch

    state_dict, _, _ = weights
    model = models.from_timm(ARCH, state_dict)
    assert model.num_classes == NUM_CLASSES
    _assert_same_tensors(timm_io.to_timm_state_dict(model), state_dict)
    # Exported safetensors load strictly into a fresh timm model, which then computes the same.
    path = tmp_path / "export.safetensors"
    timm_io.write_safetensors(model, path)
    fresh = timm_model(ARCH, num_classes=NUM_CLASSES)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(path)).items()})
    x = torch.from_numpy(random_images(2, 32).transpose(0, 3, 1, 2))
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), timm_atto(x).numpy())


def test_read_weights(weights, tmp_path):
    import torch

    state_dict, safetensors_path, pth_path = weights
    _assert_same_tensors(timm_io.read_weights(safetensors_path), state_dict)
    _assert_same_tensors(timm_io.read_weights(pth_path), state_dict)
    # Training checkpoints nest the weights; non-tensor entries are ignored.
    nested = tmp_path / "nested.pth"
    torch.save({"model": torch.load(pth_path, weights_only=True), "epoch": 3}, nested)
    _assert_same_tensors(timm_io.read_weights(nested), state_dict)

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        timm_io.read_weights(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights format"):
        timm_io.read_weights(tmp_path / "w.npz")
    # Arbitrary pickled objects are refused (weights_only=True), never executed.
    evil = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "obj": _Pickled()}, evil)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        timm_io.read_weights(evil)


class _Pickled:
    pass


def test_mismatched_state_dicts_name_the_keys(weights):
    state_dict, _, _ = weights
    bad = dict(state_dict)
    del bad["stages.1.blocks.0.conv_dw.weight"]
    bad["stages.9.extra.weight"] = np.zeros(3, np.float32)
    bad["stages.2.blocks.1.mlp.fc1.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError) as err:
        models.from_timm(ARCH, bad)
    message = str(err.value)
    assert "missing keys (1): stages.1.blocks.0.conv_dw.weight" in message
    assert "unexpected keys (1): stages.9.extra.weight" in message
    assert "stages.2.blocks.1.mlp.fc1.bias: checkpoint (7,), model expects (640,)" in message


def test_new_head_when_num_classes_differs():
    state_dict = state_dict_numpy(
        randomize_torch_model(timm_model("convnext_tiny", num_classes=10, **SMALL), seed=4)
    )
    model = models.from_timm("convnext_tiny", state_dict, num_classes=3, **SMALL)
    ours = timm_io.to_timm_state_dict(model)
    assert ours["head.fc.weight"].shape == (3, 16)
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("head.fc.")}
    _assert_same_tensors({k: v for k, v in ours.items() if not k.startswith("head.fc.")}, backbone)
    # Fresh head: timm's init (zero bias, small weights), not a slice of the old one.
    np.testing.assert_array_equal(ours["head.fc.bias"], 0)
    assert 0 < np.abs(ours["head.fc.weight"]).max() < 0.1
    # A backbone-only checkpoint loads too, with a fresh head.
    headless = models.from_timm("convnext_tiny", backbone, num_classes=3, **SMALL)
    np.testing.assert_array_equal(timm_io.to_timm_state_dict(headless)["head.fc.bias"], 0)


@pytest.mark.parametrize("source", ["safetensors", "pth"])
def test_convert_round_trip(weights, tmp_path, source):
    state_dict, safetensors_path, pth_path = weights
    path = safetensors_path if source == "safetensors" else pth_path
    out_dir = tmp_path / "ckpt"
    convert.import_timm_weights(ARCH, str(path), str(out_dir))
    restored, meta = convert.load(out_dir)
    assert meta["arch"] == ARCH and meta["num_classes"] == NUM_CLASSES
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(restored, nnx.Param)))
    exported = tmp_path / "back.safetensors"
    convert.export_timm_weights(str(out_dir), str(exported))
    _assert_same_tensors(load_file(str(exported)), state_dict)


def test_convert_command_line(weights, tmp_path):
    state_dict, safetensors_path, _ = weights
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cli = [sys.executable, "-m", "bgjax.cli", "convert"]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back.safetensors"
    args = ["--arch", ARCH, "--weights", str(safetensors_path), "--out", str(ckpt)]
    args += ["--num_classes", "4"]
    run = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "parameters" in run.stdout
    # Export in-process (the flags were exercised above).
    convert.export_timm_weights(str(ckpt), str(back))
    exported = load_file(str(back))
    assert exported["head.fc.weight"].shape == (4, 320)
    np.testing.assert_array_equal(exported["stem.0.weight"], state_dict["stem.0.weight"])
    with pytest.raises(ValueError, match="holds a 'convnext_atto' model"):
        convert.export_timm_weights(str(ckpt), str(back), arch="convnext_tiny")
    with pytest.raises(FileNotFoundError, match="model.json"):
        convert.load(tmp_path)
