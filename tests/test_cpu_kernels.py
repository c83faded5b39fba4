"""cpu_kernels: the switch (resolved once per model), and each CPU lowering against the plain op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import config_utils, models, tasks
from bgjax.models import cpu_kernels, depthwise, layers
from bgjax.models.segmenter import Segmenter

SIZE = 32
CONVNEXT = {k: v for k, v in config_utils.TINY_MODELS["convnext"].items() if k != "name"}
VIT = {k: v for k, v in config_utils.TINY_MODELS["vit"].items() if k != "name"}


def tiny(arch: str, kernels: str, **overrides):
    """The tiny model of `arch` (same parameters whatever `kernels`: same seed and order)."""
    name, arch_kwargs = {
        "convnext": ("convnext_atto", CONVNEXT),
        "vit": ("vit_tiny_patch16_224", VIT),
    }[arch]
    return models.create(name, 5, rngs=nnx.Rngs(0), kernels=kernels, **arch_kwargs, **overrides)


def _images(batch: int = 2):
    return jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, SIZE, SIZE, 3)), jnp.float32
    )


def _loss(model, x):
    return jnp.sum(model(x) ** 2)


def _train_step_hlo(model) -> str:
    """The lowered (StableHLO) text of a forward + backward pass."""
    return nnx.jit(nnx.grad(_loss)).lower(model, _images()).as_text()


# ------------------------------------------------------------------------------ the switch


def test_auto_resolves_by_backend_and_explicit_choices_stand(monkeypatch):
    assert cpu_kernels.resolve("xla") == "xla" and cpu_kernels.resolve("cpu") == "cpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert cpu_kernels.resolve("auto") == "cpu"
    assert cpu_kernels.ops("auto").depthwise_conv is depthwise.shifted
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert cpu_kernels.resolve("auto") == "xla"
        # The kernel set's attention keeps its gradient matmuls in the compute dtype.
        assert cpu_kernels.ops("auto").attention.func is cpu_kernels.attention_heads_first
        assert cpu_kernels.ops("cpu").name == "cpu"  # forced whatever the backend


def test_unknown_kernels_name_the_key_and_the_choices():
    for build in (
        lambda: cpu_kernels.ops("gpu"),
        lambda: tiny("convnext", "gpu"),
        lambda: tiny("vit", "fast"),
        lambda: Segmenter("convnext_atto", kernels="CPU", rngs=nnx.Rngs(0), **CONVNEXT),
    ):
        with pytest.raises(ValueError, match=r"model\.kernels.*\('auto', 'xla', 'cpu'\)"):
            build()


def test_overrides_replace_one_op():
    cpu = cpu_kernels.ops("cpu", dw_impl="grouped", attn_impl="xla")
    assert cpu.depthwise_conv is depthwise.grouped
    assert cpu.attention.keywords == {"implementation": "xla"}
    assert cpu.gelu is cpu_kernels.gelu_exact and cpu.name == "cpu"
    assert cpu_kernels.ops("xla", dw_impl="shifted").depthwise_conv is depthwise.shifted
    # Equal settings give equal op sets (models share their compiled steps).
    assert cpu_kernels.ops("xla", attn_impl="cudnn") == cpu_kernels.ops("xla", attn_impl="cudnn")
    with pytest.raises(ValueError, match="dw_impl"):
        cpu_kernels.ops(dw_impl="fft")
    with pytest.raises(ValueError, match="attn_impl"):
        cpu_kernels.ops(attn_impl="flash")


def test_xla_lowers_plain_ops_and_cpu_the_fft_kernel_gradient():
    xla, cpu = (_train_step_hlo(tiny("convnext", k)) for k in ("xla", "cpu"))
    assert "fft" not in xla and "feature_group_count = 8" in xla  # the grouped depthwise conv
    assert "fft" in cpu and "feature_group_count = 8" not in cpu


def test_auto_is_resolved_once_when_the_model_is_built(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks the CPU kernels on the CPU backend only")
    model = tiny("convnext", "auto")
    vit = tiny("vit", "auto")
    assert model.kernels == vit.kernels == "cpu"
    # The backend is not read again: not by a layer call, not when the step is traced.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "fft" in _train_step_hlo(model)
    assert vit.blocks[0].attn.ops.attention is cpu_kernels.attention_heads_first
    assert tiny("convnext", "auto").kernels == "xla"  # a model built now sees the new backend


@pytest.mark.parametrize("arch", ["convnext", "vit"])
def test_xla_and_cpu_kernels_agree(arch):
    x = _images()
    step = nnx.jit(nnx.value_and_grad(_loss))
    (loss_x, grads_x), (loss_c, grads_c) = (step(tiny(arch, k), x) for k in ("xla", "cpu"))
    assert float(loss_x) > 1e-3
    np.testing.assert_allclose(loss_c, loss_x, rtol=1e-5)
    flat_x, flat_c = (nnx.to_flat_state(g) for g in (grads_x, grads_c))
    assert [p for p, _ in flat_x] == [p for p, _ in flat_c]  # the same parameters, timm's names
    for (path, gx), (_, gc) in zip(flat_x, flat_c):
        gx, gc = np.asarray(gx.get_value()), np.asarray(gc.get_value())
        np.testing.assert_allclose(gc, gx, rtol=1e-4, atol=1e-5 * np.abs(gx).max(), err_msg=path)


def test_kernels_reach_the_model_from_the_config():
    for arch, task in (("convnext", "classify"), ("vit", "classify"), ("convnext", "segment")):
        config = config_utils.base_config()
        config_utils.set_tiny(config, arch)
        config.task = task
        config.model.kernels = "xla"
        model = nnx.eval_shape(lambda config=config: tasks.make_model(config, 9))
        encoder = model.encoder if task == "segment" else model
        assert encoder.kernels == "xla", (arch, task)


# ------------------------------------------------------------------------- the CPU lowerings


def test_depthwise_lowerings_agree():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 6)), jnp.float32)
    shifted = jax.jit(depthwise.shifted)(x, kernel)
    grouped = jax.jit(depthwise.grouped)(x, kernel)
    assert shifted.shape == x.shape
    np.testing.assert_allclose(shifted, grouped, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 13, 5), (2, 7, 28, 3)])  # FFT lengths 16x20, 14x36
def test_depthwise_shifted_gradients_match_grouped(shape):
    # The shifted lowering has a hand-written backward (flipped-kernel conv + FFT correlation).
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, shape[-1])), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = jax.vjp(depthwise.shifted, x, kernel)[1](cotangent)
    reference = jax.vjp(depthwise.grouped, x, kernel)[1](cotangent)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_fft_size_is_an_even_7_smooth_length_no_shorter_than_asked():
    # Each stage of ConvNeXt at 224 px (7 + 6, 14 + 6, 28 + 6, 56 + 6) and a few edge cases.
    sizes = [depthwise._fft_size(n) for n in (13, 20, 34, 62, 1, 2, 11)]
    assert sizes == [14, 20, 36, 64, 2, 2, 12]


def test_cpu_attention_equals_jax_attention():
    # The CPU path (heads-first einsums) computes what jax.nn.dot_product_attention does.
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
    keys = rng.random((2, 7)) > 0.4
    keys[:, 0] = True
    for mask in (None, jnp.asarray(keys)[:, None, None, :]):
        np.testing.assert_allclose(
            cpu_kernels.attention_heads_first(q, k, v, mask),
            jax.nn.dot_product_attention(q, k, v, mask=mask),
            atol=1e-6,
        )


def test_cpu_attention_gradient_equals_autodiff():
    # The hand-written VJP, on uneven batch slices (3 rows, 2 slices), with and without a key
    # mask, gives autodiff's gradients of jax.nn.dot_product_attention.
    rng = np.random.default_rng(4)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((3, 7, 2, 8)), jnp.float32) for _ in "qkvo")
    keys = rng.random((3, 7)) > 0.4
    keys[:, 0] = True
    for mask in (None, jnp.asarray(keys)[:, None, None, :]):
        heads_first = functools.partial(cpu_kernels.attention_heads_first, mask=mask, slices=2)
        ours = jax.vjp(heads_first, q, k, v)
        ref = jax.vjp(functools.partial(jax.nn.dot_product_attention, mask=mask), q, k, v)
        np.testing.assert_allclose(ours[0], ref[0], atol=1e-6)
        for got, want in zip(ours[1](d_out), ref[1](d_out)):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_gelu_exact_gradient_equals_autodiff():
    x = jnp.linspace(-8.0, 8.0, 401)
    gelu_exact = cpu_kernels.gelu_exact
    np.testing.assert_allclose(gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    assert gelu_exact(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_allclose(
        jax.grad(lambda x: (gelu_exact(x) * x).sum())(x),
        jax.grad(lambda x: (jax.nn.gelu(x, approximate=False) * x).sum())(x),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("shape", [(2, 5, 24), (2, 3, 4, 12)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_nnx_values_and_gradients(shape, dtype, kernels):
    """layers.LayerNorm ("cpu": hand-written gradient, matmul row means) vs nnx autodiff."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ours = layers.layer_norm(shape[-1], dtype, nnx.Rngs(0), cpu_kernels.ops(kernels))
    ours.scale.value = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    ours.bias.value = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    reference = nnx.LayerNorm(
        shape[-1], epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=nnx.Rngs(0)
    )
    reference.scale.value, reference.bias.value = ours.scale.value, ours.bias.value

    def loss(norm, x):  # a weighted sum, so every output element gets its own gradient
        return (norm(x).astype(jnp.float32) * weights).sum()

    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert ours(x).dtype == reference(x).dtype == dtype
    np.testing.assert_allclose(ours(x).astype(jnp.float32), reference(x).astype(jnp.float32), **tol)
    (g_ours, gx_ours), (g_ref, gx_ref) = (
        nnx.grad(loss, argnums=(0, 1))(norm, x) for norm in (ours, reference)
    )
    np.testing.assert_allclose(gx_ours, gx_ref, **tol)
    np.testing.assert_allclose(g_ours.scale.value, g_ref.scale.value, **tol)
    np.testing.assert_allclose(g_ours.bias.value, g_ref.bias.value, **tol)
