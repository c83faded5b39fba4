"""`bgjax convert` without timm/PyTorch: weights of another architecture are refused in one line
naming the keys; `--to_timm` exports a training workdir (latest, best or a given step)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from bgjax import checkpoint, config_utils, parallel, train_state
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.models import convert, registry, stacking, timm_io

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def atto_weights(tmp_path_factory):
    """convnext_atto-shaped weights (the zeros' shapes only matter: transposes keep the size)."""
    model = nnx.eval_shape(lambda: registry.create("convnext_atto", num_classes=10))
    weights = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = timm_io._to_timm(path, np.empty(var.shape, np.uint8)).shape
        weights[timm_io._timm_key(path)] = np.zeros(shape, np.float32)
    path = tmp_path_factory.mktemp("weights") / "atto.safetensors"
    save_file(weights, str(path))
    return path


def test_weights_of_another_architecture_name_the_keys(atto_weights, tmp_path):
    with pytest.raises(ValueError) as error:
        convert.import_timm_weights("vit_tiny_patch16_224", str(atto_weights), str(tmp_path))
    message = str(error.value)
    assert "missing keys (152): blocks.0.attn.proj.bias" in message
    assert "unexpected keys (128): head.fc.bias" in message

    weights = load_file(str(atto_weights))
    weights["stem.0.weight"] = np.zeros((3, 3, 4, 4), np.float32)
    del weights["stages.0.blocks.0.gamma"]
    weights["extra.weight"] = np.zeros(2, np.float32)
    other = tmp_path / "other.safetensors"
    save_file(weights, str(other))
    with pytest.raises(ValueError) as error:
        convert.import_timm_weights("convnext_atto", str(other), str(tmp_path / "out"))
    message = str(error.value)
    assert "missing keys (1): stages.0.blocks.0.gamma" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "stem.0.weight: checkpoint (3, 3, 4, 4), model expects (40, 3, 4, 4)" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_convert_command_refuses_in_one_line(atto_weights, tmp_path):
    out = tmp_path / "ckpt"
    args = ["--arch", "vit_tiny_patch16_224", "--weights", str(atto_weights), "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "bgjax.cli", "convert", *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bgjax convert: error: timm state dict"), lines
    assert "missing keys (152)" in lines[0] and "unexpected keys (128)" in lines[0]


def _write_run(workdir, config):
    """A run's workdir with checkpoints at steps 1 and 2 (other weights), written through the
    trainer's own pieces without training."""
    info = data_lib.get_source(config.data, "train").info
    workdir_lib.write_run_files(workdir, config, info)
    setup = train_state.make_setup(config, info, parallel.make_mesh(config.mesh))
    state = setup.init()
    ckpt = checkpoint.Checkpointer(workdir / workdir_lib.CHECKPOINTS, async_save=False)
    ckpt.save(1, state)
    ckpt.save(2, dict(state, params=jax.tree.map(lambda p: p + 1, state["params"])))
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny ViT run's workdir with checkpoints at steps 1 and 2."""
    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    return _write_run(tmp_path_factory.mktemp("run") / "vit", config)


def test_to_timm_from_a_training_workdir(trained_run, tmp_path):
    exported = {}
    for step in (None, 1, "best"):
        out = tmp_path / f"{step}.safetensors"
        _, meta = convert.export_timm_weights(str(trained_run), str(out), step=step)
        assert meta["arch"] == "vit_tiny_patch16_224" and meta["num_classes"] == 4
        exported[step] = load_file(str(out))
    latest = timm_io.to_timm_state_dict(workdir_lib.restore(str(trained_run)).model)
    first = timm_io.to_timm_state_dict(workdir_lib.restore(str(trained_run), step=1).model)
    for key, value in latest.items():
        np.testing.assert_array_equal(exported[None][key], value, err_msg=key)
        np.testing.assert_array_equal(exported[1][key], first[key], err_msg=key)
    assert not np.array_equal(exported[None]["head.weight"], exported[1]["head.weight"])
    # No best_metric evaluated: "best" is the latest step.
    np.testing.assert_array_equal(exported["best"]["head.weight"], exported[None]["head.weight"])

    with pytest.raises(ValueError, match="checkpoint step 7 does not exist.*available steps: 1, 2"):
        convert.export_timm_weights(str(trained_run), str(tmp_path / "x.safetensors"), step=7)
    with pytest.raises(FileNotFoundError, match="model.json"):  # neither kind of directory
        convert.export_timm_weights(str(tmp_path), str(tmp_path / "x.safetensors"))


def test_a_scanned_run_restores_stacked_and_exports_timm_names(trained_run, tmp_path):
    # scan_blocks stores the blocks stacked in the checkpoints; eval's restore builds the model
    # from the run's config, and the export has the per-block timm keys of the unrolled run.
    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    config.model.scan_blocks = True
    scanned = _write_run(tmp_path / "scanned", config)
    restored = workdir_lib.restore(str(scanned)).model
    assert isinstance(restored.blocks, stacking.Stack)
    out = tmp_path / "scanned.safetensors"
    convert.export_timm_weights(str(scanned), str(out))
    exported = load_file(str(out))
    # The export has the unrolled run's keys, loads into its model, which then computes what
    # the scanned one does.
    unrolled = workdir_lib.restore(str(trained_run)).model
    assert exported.keys() == timm_io.to_timm_state_dict(unrolled).keys()
    timm_io.load_timm_state_dict(unrolled, exported)
    size = config.data.image_size
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    np.testing.assert_allclose(unrolled(x), restored(x), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_dir_of_another_model_than_its_model_json_says(atto_weights, tmp_path):
    convert.import_timm_weights("convnext_atto", str(atto_weights), str(tmp_path))
    meta = json.loads((tmp_path / convert.MODEL_JSON).read_text())
    (tmp_path / convert.MODEL_JSON).write_text(json.dumps(dict(meta, arch="convnext_femto")))
    with pytest.raises(ValueError) as error:
        convert.export_timm_weights(str(tmp_path), str(tmp_path / "out.safetensors"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'params'} does not hold a 'convnext_femto' model")
    assert "\n" not in message
    assert "is not compatible with the stored shape" in message  # Orbax's, for one array
