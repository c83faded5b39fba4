"""ViT weights at another resolution: the position embedding is resampled on load exactly as
timm's pretrained loading does (`checkpoint_filter_fn`), on every path that loads weights."""

import json

import numpy as np
import pytest
from flax import nnx
from parity_utils import (
    random_images,
    randomize_torch_model,
    require_timm,
    state_dict_numpy,
    timm_model,
)

from bgjax import config_utils, parallel, tasks, train_state
from bgjax import data as data_lib
from bgjax.models import convert, from_timm, timm_io

pytestmark = pytest.mark.parity

# Tiny DINOv2-style ViTs (patch 14): 42 px = a 3x3 grid, 70 px = 5x5.
TINY = dict(depth=1, embed_dim=32, num_heads=2)
NAMES = ("vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2")  # class / register prefix


@pytest.fixture(scope="module", params=NAMES)
def checkpoint(request):
    """(name, timm model at 42 px, its randomised weights as NumPy)."""
    name = request.param
    model = randomize_torch_model(timm_model(name, num_classes=5, img_size=42, **TINY), seed=1)
    return name, model, state_dict_numpy(model)


def _timm_loaded_at(name: str, state_dict: dict, img_size: int):
    """A timm model at `img_size` given the weights the way its pretrained loading does."""
    import torch

    checkpoint_filter_fn = require_timm().models.vision_transformer.checkpoint_filter_fn

    model = timm_model(name, num_classes=5, img_size=img_size, **TINY)
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    model.load_state_dict(checkpoint_filter_fn(tensors, model))
    return model


@pytest.mark.parametrize("img_size", [70, 28])  # upsampled 3x3 -> 5x5, antialiased 3x3 -> 2x2
def test_from_timm_resamples_like_timm(checkpoint, img_size):
    import torch

    name, _, state_dict = checkpoint
    theirs = _timm_loaded_at(name, state_dict, img_size)
    ours = from_timm(name, state_dict, img_size=img_size, **TINY)
    assert ours.grid_size == (img_size // 14,) * 2
    np.testing.assert_allclose(
        timm_io.to_timm_state_dict(ours)["pos_embed"],
        theirs.pos_embed.detach().numpy(),
        atol=2e-6,
        rtol=0,
    )
    images = random_images(2, img_size, seed=3)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(ours(images)), expected, atol=1e-4, rtol=1e-4)


def test_from_timm_without_img_size_keeps_the_checkpoints_grid(checkpoint, tmp_path):
    name, _, state_dict = checkpoint
    ours = from_timm(name, state_dict, **TINY)  # the registry's default would be 518 px
    assert ours.img_size == (42, 42)
    np.testing.assert_array_equal(
        timm_io.to_timm_state_dict(ours)["pos_embed"], state_dict["pos_embed"]
    )
    # `bgjax convert`'s checkpoint records the size, so it rebuilds at that grid.
    resampled = from_timm(name, state_dict, img_size=70, **TINY)
    convert.save(resampled, tmp_path, arch=name)
    assert json.loads((tmp_path / "model.json").read_text())["img_size"] == [70, 70]
    restored, _ = convert.load(tmp_path, **TINY)
    assert restored.grid_size == (5, 5)
    np.testing.assert_array_equal(restored.pos_embed[...], resampled.pos_embed[...])


def test_a_non_square_table_is_named():
    state_dict = {"pos_embed": np.zeros((1, 1 + 6, 32), np.float32)}
    model = nnx.eval_shape(lambda: timm_io.registry.create("vit_small_patch14_dinov2", **TINY))
    with pytest.raises(ValueError, match=r"pos_embed \(1, 7, 32\) cannot be fitted to grid"):
        timm_io.load_timm_state_dict(model, state_dict)


def test_config_model_init_at_another_grid(tmp_path):
    """config.model.init: a 48-px (6x6) checkpoint into the tiny 32-px (4x4) ViT of a run."""
    import torch

    resample_abs_pos_embed = require_timm().layers.resample_abs_pos_embed
    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    assert config.data.image_size == 32
    source = data_lib.get_source(config.data, "train")
    donor_config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    donor_config.model.img_size = 48
    donor = tasks.make_model(donor_config, source.info.num_classes, rngs=nnx.Rngs(5))
    timm_io.write_safetensors(donor, tmp_path / "donor.safetensors")

    mesh = parallel.make_mesh([("data", -1)])
    setup = train_state.make_setup(config, source.info, mesh)
    state = train_state.load_init_weights(
        setup.init(), setup, str(tmp_path / "donor.safetensors"), config
    )
    got = nnx.merge(setup.graphdef, state["params"], state["rest"])
    assert got.grid_size == (4, 4)
    expected = resample_abs_pos_embed(
        torch.from_numpy(np.array(donor.pos_embed[...])), new_size=[4, 4], num_prefix_tokens=1
    )  # timm's defaults: bicubic, antialias=True
    np.testing.assert_allclose(got.pos_embed[...], expected.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got.head.kernel[...], donor.head.kernel[...])
