"""ConvNeXt: timm parity, parameter counts, depthwise lowering, masking, training options."""

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

from bgjax import data, models
from bgjax.models import convnext, cpu_kernels, depthwise, masking, timm_io

# One small architecture for everything but parity. Equal widths keep the number of distinct
# parameter shapes (one initialiser compile each) low; the grouped depthwise conv compiles much
# faster than the 49 shifted multiply-adds (those are covered by the atto parity test).
TINY = dict(depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), ls_init_value=0.5, dw_impl="grouped")
SIZE = 64  # feature maps 16, 8, 4, 2


def tiny(**overrides):
    """Same parameters for every call (same seed, same construction order)."""
    return convnext.MODELS["convnext_tiny"](
        num_classes=5, rngs=nnx.Rngs(0), **{**TINY, **overrides}
    )


@pytest.fixture(scope="module")
def batch():
    x, mask = masked_batch(SIZE, corner=50)
    return jnp.asarray(x), jnp.asarray(mask)


@nnx.jit
def _run(model, x, mask=None):
    """(logits, intermediates) in one compiled call; models of equal config share the compile."""
    return model(x, mask), model.forward_intermediates(x, mask)


def _logits(model, x, mask=None):
    return np.asarray(_run(model, x, mask)[0])


# --------------------------------------------------------------------------------- parity


def _check_parity(torch_model, ours, x):
    """Logits and every intermediate feature map of `ours` equal timm's (fp32)."""
    import torch

    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
        logits, inter = jax.tree.map(np.asarray, _run(ours, jnp.asarray(x)))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref_logits = torch_model(xt).numpy()
        ref_stem = torch_model.stem(xt).numpy().transpose(0, 2, 3, 1)
        _, ref_stages = torch_model.forward_intermediates(xt)
    assert np.abs(ref_logits).max() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(inter["stem"], ref_stem, atol=1e-4, rtol=1e-4)
    assert len(ref_stages) == 4
    for i, ref in enumerate(ref_stages):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(inter[f"stages.{i}"], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("convnext_atto", {}),  # conv_mlp=True: 1×1 convs, LayerNorm2d
        # conv_mlp=False (tiny..xlarge) at a small depth and width.
        ("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40))),
    ],
)
def test_parity_with_timm(name, kwargs):
    torch_model = randomize_torch_model(timm_model(name, num_classes=7, **kwargs), seed=0)
    ours = models.from_timm(name, state_dict_numpy(torch_model), **kwargs)
    assert ours.num_classes == 7
    _check_parity(torch_model, ours, random_images(2, SIZE, seed=0))


@pytest.mark.parity
def test_num_classes_0_is_timms_headless_model():
    """timm's num_classes=0: no `head.fc`, the call returns the normalised pooled features."""
    arch = {k: TINY[k] for k in ("depths", "dims", "ls_init_value")}
    torch_model = randomize_torch_model(timm_model("convnext_tiny", num_classes=0, **arch))
    weights = state_dict_numpy(torch_model)
    ours = models.from_timm("convnext_tiny", weights, num_classes=0, **TINY)
    assert ours.head.fc is None and "head.norm.weight" in weights
    assert set(timm_io.to_timm_state_dict(ours)) == set(weights)  # no zero-size classifier
    x = random_images(2, SIZE, seed=3)
    features = np.asarray(_run(ours, jnp.asarray(x))[0])
    np.testing.assert_allclose(features, torch_forward(torch_model, x), atol=1e-4, rtol=1e-4)
    assert features.shape == (2, TINY["dims"][-1])


@pytest.fixture(scope="module")
def abstract_models():
    """ConvNeXt T/S/B/L built from shapes only (nothing allocated)."""
    names = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
    return {n: nnx.eval_shape(lambda n=n: models.create(n, 1000)) for n in names}


@pytest.mark.parity
def test_param_counts_match_timm(abstract_models):
    import torch

    timm = require_timm()
    for name, abstract in abstract_models.items():
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        ours = sum(int(np.prod(leaf.shape)) for leaf in leaves)
        with torch.device("meta"):
            theirs = sum(p.numel() for p in timm.create_model(name).parameters())
        assert ours == theirs, name


def test_abstract_large_carries_fsdp_metadata(abstract_models):
    specs = nnx.get_partition_spec(nnx.state(abstract_models["convnext_large"], nnx.Param))
    block = specs["stages"][2]["blocks"][0]
    assert block["conv_dw"]["kernel"].get_value() == jax.P(None, None, None, "fsdp")
    assert block["mlp"]["fc1"]["kernel"].get_value() == jax.P(None, "fsdp")
    assert block["mlp"]["fc2"]["kernel"].get_value() == jax.P("fsdp", None)
    assert specs["stem"][0]["kernel"].get_value() == jax.P(None, None, None, "fsdp")
    # Norms, biases, layer-scale and the head stay replicated.
    for leaf in (block["norm"]["scale"], block["gamma"], block["mlp"]["fc1"]["bias"]):
        assert leaf.get_value() == jax.P()
    assert specs["head"]["fc"]["kernel"].get_value() == jax.P()


# ------------------------------------------------------------------------- building blocks


def test_depthwise_conv_lowering_follows_the_switch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 6)), jnp.float32)
    shifted = jax.jit(depthwise.shifted)(x, kernel)
    # The module takes the lowering of its model's kernels ("auto": by backend) or of dw_impl;
    # same parameters and values either way.
    auto = "shifted" if jax.default_backend() == "cpu" else "grouped"
    cases = [("auto", "auto", auto), ("cpu", "auto", "shifted"), ("xla", "auto", "grouped")]
    cases += [("auto", "shifted", "shifted"), ("cpu", "grouped", "grouped")]
    for kernels, dw_impl, expected in cases:
        ops = cpu_kernels.ops(kernels, dw_impl=dw_impl)
        conv = convnext.DepthwiseConv(6, ops=ops, rngs=nnx.Rngs(0))
        conv.kernel.set_value(kernel)
        assert conv.ops.depthwise_conv is getattr(depthwise, expected)
        np.testing.assert_allclose(conv(x), shifted + conv.bias[...], atol=1e-5)


def test_drop_path_rates_rise_linearly():
    rates = convnext.drop_path_rates(0.3, (2, 2, 6, 2))
    assert [len(r) for r in rates] == [2, 2, 6, 2]
    flat = np.concatenate(rates)
    np.testing.assert_allclose(flat, np.linspace(0, 0.3, 12))


# ------------------------------------------------------------------------------- masking


def test_early_masking_ignores_background(batch):
    x, mask = batch
    model = tiny(masking="early")
    noise = jnp.asarray(random_images(4, SIZE, seed=9))
    x_other_bg = jnp.where(mask[..., None] > 0, x, noise)
    logits = _logits(model, x, mask)
    np.testing.assert_array_equal(logits, _logits(model, x_other_bg, mask))
    # "black" fill: the same as an unmasked model shown the image with black background.
    fill = masking.early_fill_value("black", data.IMAGENET_MEAN, data.IMAGENET_STD)
    blacked = jnp.where(mask[..., None] > 0, x, jnp.asarray(fill))
    np.testing.assert_allclose(logits, _logits(tiny(), blacked), atol=1e-5)
    # No gradient reaches background pixels.
    grad_x = nnx.jit(nnx.grad(lambda x, m: m(x, mask).sum()))(x, model)
    bg = np.asarray(mask) == 0
    assert np.all(np.asarray(grad_x)[bg] == 0)
    assert np.abs(np.asarray(grad_x)[~bg]).max() > 0


@pytest.mark.parametrize("late_stage", [3, 4])
def test_late_masking_zeroes_masked_features(batch, late_stage):
    x, mask = batch
    model = tiny(masking="late", late_stage=late_stage)
    features = np.asarray(_run(model, x, mask)[1][f"stages.{late_stage - 1}"])
    grid = np.asarray(masking.resize_mask_nearest(mask, features.shape[1:3]))
    assert 0 < grid.sum() < grid.size
    assert np.all(features[grid == 0] == 0)
    assert np.all(np.abs(features[grid == 1]).max(-1) > 0)


def test_masked_mean_pools_over_foreground_only(batch):
    x, mask = batch
    mean_model = tiny(masking="late", late_pool="mean")
    fg_model = tiny(masking="late", late_pool="masked_mean")
    logits_mean = np.asarray(_logits(mean_model, x, mask))
    logits_fg = np.asarray(_logits(fg_model, x, mask))
    assert np.isfinite(logits_fg).all()
    assert np.abs(logits_mean - logits_fg).max() > 1e-3
    # masked_mean is exactly the head on the foreground mean of the final features.
    features = np.asarray(_run(fg_model, x, mask)[1]["stages.3"])
    grid = np.asarray(masking.resize_mask_nearest(mask, features.shape[1:3]))
    pooled = (features * grid[..., None]).sum((1, 2)) / np.maximum(grid.sum((1, 2)), 1)[:, None]
    np.testing.assert_allclose(logits_fg, fg_model.head(jnp.asarray(pooled)), atol=1e-5)
    np.testing.assert_allclose(
        logits_mean, mean_model.head(jnp.asarray(features.mean((1, 2)))), atol=1e-5
    )


def _trainable_paths(model) -> set[str]:
    flat = nnx.to_flat_state(nnx.state(model, model.frozen_backbone_filter()))
    return {".".join(map(str, path)) for path, _ in flat}


def test_frozen_backbone_filter_and_gradients(batch):
    x, mask = batch
    for masking_kind in ("none", "early", "late"):
        model = tiny(masking=masking_kind)
        params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        expected = {p for p in params if p.startswith("head.")}
        if masking_kind == "late":  # also the last stage, its norms included
            expected |= {p for p in params if p.startswith("stages.3.")}
            assert "stages.3.downsample.0.scale" in expected
        assert _trainable_paths(model) == expected, masking_kind
    # Masked after the last stage, nothing but the head follows the mask (the paper's code).
    last = tiny(masking="late", late_stage=4)
    assert _trainable_paths(last) == {p for p in params if p.startswith("head.")}

    def loss(m):
        return jnp.sum(m(x, mask) ** 2)

    # Differentiating w.r.t. the filter only: gradients exactly for the trainable parameters,
    # none of them identically zero, nothing for the frozen backbone.
    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, model.frozen_backbone_filter())))(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == expected
    assert all(np.abs(g).max() > 0 for g in flat.values())


def test_bad_inputs_raise_clear_errors(batch):
    x, mask = batch
    late = tiny(masking="late")
    with pytest.raises(ValueError, match=r"mask shape \(4, 32, 32\)"):
        late(x, mask[:, ::2, ::2])
    with pytest.raises(ValueError, match="needs a foreground mask"):
        late(x)
    with pytest.raises(ValueError, match="masking='none'"):
        tiny()(x, mask)
    with pytest.raises(ValueError, match="unknown model 'convnext_huge'"):
        models.create("convnext_huge", 10)
    with pytest.raises(ValueError, match="unknown masking 'middle'"):
        tiny(masking="middle")
    with pytest.raises(ValueError, match="late_stage must be 3 or 4"):
        tiny(masking="late", late_stage=2)
    with pytest.raises(ValueError, match="dw_impl"):
        tiny(dw_impl="fft")


# ------------------------------------------------------------------ training-time options


def test_drop_path_is_random_in_training_only(batch):
    x, _ = batch
    model = tiny(drop_path_rate=0.5)
    train = nnx.jit(lambda m, x: m(x, train=True))
    a, b = np.asarray(train(model, x)), np.asarray(train(model, x))
    assert np.abs(a - b).max() > 1e-4  # the RNG stream advances between steps
    plain = tiny()  # Dropout forks the RNG stream, so the initial parameters differ: copy them
    nnx.update(plain, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(_logits(model, x), _logits(plain, x), atol=1e-6)  # eval: no drop


def test_remat_gives_the_same_gradients():
    # One stage suffices: remat wraps each block of a stage.
    x = jnp.asarray(random_images(2, 8, seed=2)).repeat(4, axis=-1)[..., :8]
    stages = [
        convnext.Stage(8, 8, [0.0, 0.0], downsample=False, remat=remat, conv_mlp=False,
                       ls_init_value=0.5, ops=cpu_kernels.ops(dw_impl="grouped"),
                       dtype=jnp.float32, rngs=nnx.Rngs(0))
        for remat in (False, True)
    ]  # fmt: skip

    def grads(stage):
        g = nnx.jit(nnx.grad(lambda s: jnp.sum(s(x) ** 2)))(stage)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(g))

    plain, remat = map(grads, stages)
    assert np.abs(plain["blocks"][0]["conv_dw"]["kernel"]).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)


def test_bf16_compute_with_fp32_params(batch):
    x, _ = batch
    bf16 = tiny(dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    logits, inter = _run(bf16, x)
    assert inter["stages.2"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _logits(tiny(), x), atol=0.1)
