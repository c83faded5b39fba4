"""ResNet: timm parity (eval and train-mode BN statistics), weights out, BN modes, masking, and
a few train steps on the synthetic data on one device and on a data mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity_utils import (
    masked_batch,
    random_images,
    randomize_torch_model,
    require_timm,
    state_dict_numpy,
    timm_model,
    torch_forward,
)

from bgjax import config_utils, models, parallel, train_state, train_step
from bgjax import data as data_lib
from bgjax.data import pipeline
from bgjax.models import masking, resnet, timm_io

# Parity at 64 px: at 32 px ResNet-18's layer4 is 1x1, and train-mode BN over 2 values per
# channel amplifies float rounding far past 1e-4. timm's plain stem is 64 wide whatever the rest.
SIZE = 64
SMALL_BOTTLENECK = dict(layers=(1, 2, 1, 1), channels=(8, 16, 16, 32))
# Everything but parity: our own tiny layout (feature maps 16, 8, 4, 2 at 64 px).
TINY = dict(layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_channels=8)


def tiny(num_classes=5, **overrides):
    """Same parameters for every call (same seed, same construction order)."""
    return resnet.MODELS["resnet18"](
        num_classes=num_classes, rngs=nnx.Rngs(0), **{**TINY, **overrides}
    )


@pytest.fixture(scope="module")
def batch():
    x, mask = masked_batch(SIZE, corner=40)
    return jnp.asarray(x), jnp.asarray(mask)


@nnx.jit
def _run(model, x, mask=None):
    return model(x, mask), model.forward_intermediates(x, mask)


@nnx.jit
def _train_forward(model, x, mask=None):
    """A train-mode call; updates the model's running statistics in place."""
    return model(x, mask, train=True)


def _logits(model, x, mask=None):
    return np.asarray(_run(model, x, mask)[0])


def _bn_stats(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


# --------------------------------------------------------------------------------- parity


@pytest.mark.parity
@pytest.mark.parametrize(
    "name, kwargs",
    [("resnet18", {}), ("resnet50", SMALL_BOTTLENECK), ("wide_resnet50_2", SMALL_BOTTLENECK)],
)
def test_parity_with_timm_eval_and_train_mode(name, kwargs, tmp_path):
    """Eval: logits and every stage's features equal timm's. Train mode: the logits (batch
    statistics) and every BN's running statistics after one forward pass equal torch's."""
    import torch
    from safetensors.numpy import load_file

    torch_model = randomize_torch_model(timm_model(name, num_classes=7, **kwargs), seed=0)
    weights = state_dict_numpy(torch_model)
    ours = models.from_timm(name, weights, **kwargs)
    assert ours.num_classes == 7
    # Every tensor of timm's state dict is ours (the counter `num_batches_tracked` aside).
    exported = timm_io.to_timm_state_dict(ours)
    assert set(exported) == {k for k in weights if not k.endswith("num_batches_tracked")}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)

    x = random_images(2, SIZE, seed=0)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with jax.default_matmul_precision("highest"):
        logits, inter = jax.tree.map(np.asarray, _run(ours, jnp.asarray(x)))
    with torch.no_grad():
        ref_logits = torch_model(xt).numpy()
        ref_stem, *ref_stages = torch_model.forward_intermediates(xt, intermediates_only=True)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    for key, ref in zip(("stem", "layer1", "layer2", "layer3", "layer4"), (ref_stem, *ref_stages)):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(inter[key], ref, atol=1e-4, rtol=1e-4, err_msg=key)

    before = _bn_stats(ours)
    torch_model.train()
    ref_train = torch_forward(torch_model, x)
    with jax.default_matmul_precision("highest"):
        train_logits = np.asarray(_train_forward(ours, jnp.asarray(x)))
    np.testing.assert_allclose(train_logits, ref_train, atol=1e-4, rtol=0)
    assert np.abs(train_logits - logits).max() > 1e-2  # batch statistics, not running ones
    moved = timm_io.to_timm_state_dict(ours)
    ref_moved = state_dict_numpy(torch_model)
    running = [k for k in moved if k.endswith(("running_mean", "running_var"))]
    assert len(running) == 2 * len([k for k in weights if k.endswith("num_batches_tracked")])
    for key in running:
        np.testing.assert_allclose(moved[key], ref_moved[key], atol=1e-4, rtol=1e-5, err_msg=key)
    after = _bn_stats(ours)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)

    # Exported (moved statistics included), the weights load strictly into a fresh timm model.
    path = tmp_path / f"{name}.safetensors"
    timm_io.write_safetensors(ours, path)
    fresh = timm_model(name, num_classes=7, **kwargs)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(path)).items()})
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(_logits(ours, x), torch_forward(fresh, x), atol=1e-4, rtol=0)


@pytest.mark.parity
def test_param_counts_match_timm():
    import torch

    timm = require_timm()
    for name in resnet.MODELS:
        abstract = nnx.eval_shape(lambda n=name: models.create(n, 1000))
        ours = sum(
            int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param))
        )
        with torch.device("meta"):
            theirs = sum(p.numel() for p in timm.create_model(name).parameters())
        assert ours == theirs, name


def test_new_head_when_num_classes_differs():
    """A checkpoint's `fc` of another class count (5) is skipped for a 9-class model; the
    rest, running statistics included, loads."""
    weights = timm_io.to_timm_state_dict(tiny())
    rng = np.random.default_rng(6)
    for key in weights:  # statistics unlike a fresh model's zeros and ones
        if "running" in key:
            weights[key] = rng.uniform(0.5, 1.5, weights[key].shape).astype(np.float32)
    loaded = models.from_timm("resnet18", weights, num_classes=9, **TINY)
    assert loaded.fc.kernel.get_value().shape == (8, 9)
    got = timm_io.to_timm_state_dict(loaded)
    for key in ("layer4.0.bn2.running_var", "layer1.0.conv1.weight"):
        np.testing.assert_array_equal(got[key], weights[key])


# --------------------------------------------------------------------------- BatchNorm modes


def test_freeze_bn_uses_and_keeps_running_statistics(batch):
    x, _ = batch
    frozen = tiny(freeze_bn=True)
    before = _bn_stats(frozen)
    train_logits = np.asarray(_train_forward(frozen, x))
    assert all(np.array_equal(before[k], v) for k, v in _bn_stats(frozen).items())
    np.testing.assert_allclose(train_logits, _logits(frozen, x), atol=1e-6)
    live = tiny()
    live_train = np.asarray(_train_forward(live, x))
    assert np.abs(live_train - train_logits).max() > 1e-3  # a live BN normalises by the batch
    assert any(np.abs(_bn_stats(live)[k] - before[k]).max() > 0 for k in before)


# ------------------------------------------------------------------------------- masking


def test_early_masking_ignores_background(batch):
    x, mask = batch
    model = tiny(masking="early")
    noise = jnp.asarray(random_images(4, SIZE, seed=9))
    x_other_bg = jnp.where(mask[..., None] > 0, x, noise)
    np.testing.assert_array_equal(_logits(model, x, mask), _logits(model, x_other_bg, mask))


@pytest.mark.parametrize("late_stage", [3, 4])
def test_late_masking_zeroes_background_features(batch, late_stage):
    x, mask = batch
    model = tiny(masking="late", late_stage=late_stage)
    features = np.asarray(_run(model, x, mask)[1][f"layer{late_stage}"])
    grid = np.asarray(masking.resize_mask_nearest(mask, features.shape[1:3]))
    assert 0 < grid.sum() < grid.size
    assert np.all(features[grid == 0] == 0)
    assert np.abs(features[grid == 1]).max() > 0


def test_frozen_backbone_filter_trains_fc_and_what_follows_a_late_mask():
    def trainable(model):
        flat = nnx.to_flat_state(nnx.state(model, model.frozen_backbone_filter()))
        return {".".join(map(str, p)) for p, _ in flat}

    assert trainable(tiny()) == {"fc.kernel", "fc.bias"}
    late3 = trainable(tiny(masking="late", late_stage=3))
    assert {"fc.kernel", "layer4.0.conv1.kernel", "layer4.0.bn2.scale"} <= late3
    assert not any(p.startswith(("layer3", "conv1", "bn1")) for p in late3)
    assert not any("running" in p for p in late3)  # statistics are never optimiser state
    assert trainable(tiny(masking="late", late_stage=4)) == {"fc.kernel", "fc.bias"}


def test_bad_arguments_raise_clear_errors(batch):
    x, mask = batch
    with pytest.raises(ValueError, match="unknown ResNet block 'dense'"):
        resnet.ResNet(block="dense", layers=(1, 1, 1, 1), num_classes=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ResNet needs 4 stages"):
        tiny(layers=(1, 1, 1))
    with pytest.raises(ValueError, match="late_stage must be 3 or 4"):
        tiny(masking="late", late_stage=2)
    with pytest.raises(ValueError, match="needs a foreground mask"):
        tiny(masking="late")(x)


# ------------------------------------------------------------------------------- training


def test_batch_statistics_are_synchronised_over_a_data_mesh(batch):
    """SyncBN: a train-mode call on a batch sharded over 4 devices computes the statistics of
    the whole batch (outputs and running statistics equal the unsharded call's), not of each
    device's rows."""
    x, _ = batch
    mesh = parallel.make_mesh([("data", 4), ("fsdp", 1)])
    sharded, local = tiny(), tiny()
    out = _train_forward(sharded, jax.device_put(x, parallel.batch_sharding(mesh)))
    assert len(out.sharding.device_set) == 4
    np.testing.assert_allclose(out, _train_forward(local, x), atol=1e-5)
    stats, ref = _bn_stats(sharded), _bn_stats(local)
    for key in stats:
        np.testing.assert_allclose(stats[key], ref[key], atol=1e-6, err_msg=key)
    # Per-device statistics would differ: device 0's rows alone have another mean.
    stem = np.asarray(_run(tiny(), x)[1]["stem"])
    assert np.abs(stem[:1].mean((0, 1, 2)) - stem.mean((0, 1, 2))).max() > 1e-3


@pytest.mark.slow
def test_synthetic_resnet_trains_on_a_data_mesh():
    """arch=resnet trains on the synthetic data (the trainer's default 4-device data mesh);
    the BN running statistics, carried in state["rest"], move with the steps."""
    config = config_utils.load_config("synthetic.py:arch=resnet,size=tiny")
    source = data_lib.get_source(config.data, "train")
    mesh = parallel.make_mesh(config.mesh)
    assert mesh.shape["data"] == 4
    setup = train_state.make_setup(config, source.info, mesh)
    batches = iter(
        pipeline.build(source, batch_size=config.batch_size, image_size=config.data.image_size,
                       train=True, seed=config.seed, num_devices=mesh.size)
    )  # fmt: skip
    step = train_step.jit_train_step(config, setup, source.info, mesh)
    state = setup.init()
    initial = nnx.to_pure_dict(jax.tree.map(np.asarray, state["rest"]))
    losses = []
    for _ in range(2):
        state, metrics = step(state, pipeline.to_global(next(batches), mesh), None)
        losses.append(float(parallel.fetch(metrics)["loss"]))
    assert np.isfinite(losses).all()
    rest = nnx.to_pure_dict(jax.tree.map(np.asarray, state["rest"]))
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), rest, initial)
    assert min(jax.tree.leaves(moved)) > 0
