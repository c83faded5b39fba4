"""The layers both model families build from, and lowerings that XLA runs fast on every backend.

Constructors (`kernel_init`, `layer_norm`, `dense`, `patchify_conv`): timm's initialisation and
LayerNorm, FSDP metadata on one large kernel dim, and the fast lowerings below plugged in.
`path_has_prefix`: the path test of the models' frozen-backbone filters. `gelu_exact`: torch's
GELU with a one-pass hand-written gradient (both families' MLPs).

Lowerings of dense and patchify layers that XLA runs fast on every backend, the CPU included.

Both are drop-in functions for Flax's pluggable ops, so the layers stay `nnx.Linear` /
`nnx.Conv` with timm's parameter names and shapes, and compute the same values (up to the
order of floating-point sums). Measured on a 2-core CPU (fwd+bwd, batch 16, BENCHMARKS.md):

- `rows_dot_general` (`nnx.Linear(..., dot_general=rows_dot_general)`): a dense layer on
  (B, N, C) or (B, H, W, C) activations as ONE 2-D matmul over the flattened rows. Given the
  rank-3/4 form, XLA:CPU transposes the whole output gradient before the weight-gradient
  matmul: 2.4x slower for a ConvNeXt-T stage-1 MLP layer.
- `patch_conv` (`nnx.Conv(..., conv_general_dilated=patch_conv)`): a convolution whose stride
  equals its kernel (patchify stems, ConvNeXt downsampling and 1x1 convs, ViT patch embedding)
  as a reshape + matmul: 4x faster for the ConvNeXt stem, 9x for a ViT-S/16 patch embedding.
  Any other convolution goes to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

_NHWC = ("NHWC", "HWIO", "NHWC")


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """`lax.dot_general` that runs a (..., K) x (K, N) product on the rows flattened to 2-D."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    plain = lhs_contract == (lhs.ndim - 1,) and rhs_contract == (0,) and batch == ((), ())
    if not plain or lhs.ndim <= 2 or rhs.ndim != 2 or kwargs.get("out_sharding") is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    kwargs.pop("out_sharding", None)
    rows = lhs.reshape(-1, lhs.shape[-1])  # leading dims are contiguous: a bitcast
    out = jax.lax.dot_general(rows, rhs, (((1,), (0,)), ((), ())), precision=precision, **kwargs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def _is_patchify(lhs, rhs, window_strides, padding, dimension_numbers, **options) -> bool:
    """A 2-D NHWC convolution with stride == kernel size, no padding, dilation or groups."""
    if lhs.ndim != 4 or rhs.ndim != 4 or options.get("out_sharding") is not None:
        return False
    if dimension_numbers != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return False
    undilated = all(
        tuple(options.get(k) or (1, 1)) == (1, 1) for k in ("lhs_dilation", "rhs_dilation")
    )
    if isinstance(padding, str):
        valid = padding == "VALID"
    else:
        valid = all(tuple(p) == (0, 0) for p in padding)
    ungrouped = options.get("feature_group_count", 1) == 1 and (
        options.get("batch_group_count", 1) == 1
    )
    return tuple(window_strides) == tuple(rhs.shape[:2]) and valid and undilated and ungrouped


def patch_conv(lhs, rhs, window_strides, padding, *args, **kwargs):
    """`lax.conv_general_dilated`, with stride == kernel ("patchify") convs as one matmul."""
    names = ("lhs_dilation", "rhs_dilation", "dimension_numbers", "feature_group_count")
    options = {**dict(zip(names, args)), **kwargs}
    if not _is_patchify(lhs, rhs, window_strides, padding, **options):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
    b, h, w, c = lhs.shape
    kh, kw, _, features = rhs.shape
    gh, gw = h // kh, w // kw  # VALID: rows/columns past the last whole patch are dropped
    patches = lhs[:, : gh * kh, : gw * kw].reshape(b, gh, kh, gw, kw, c)
    # (kh, kw, c) order, as the HWIO kernel flattens; a no-op transpose for 1x1 kernels.
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, kh * kw * c)
    extra = {k: options[k] for k in ("precision", "preferred_element_type") if k in options}
    out = jax.lax.dot_general(
        patches, rhs.reshape(kh * kw * c, features), (((1,), (0,)), ((), ())), **extra
    )
    return out.reshape(b, gh, gw, features)


@jax.custom_vjp
def gelu_exact(x):
    """Exact GELU, torch's default: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), one-pass gradient.

    The forward is torch's formula. `jax.nn.gelu(approximate=False)` goes through erfc instead,
    whose XLA:CPU expansion (exp, divide, two polynomials, selects) is 2.7x slower for a ViT-S
    MLP activation (3152 x 1536: 3.96 vs 1.44 ms); the two agree to 5e-7. The gradient is
    torch's formula, g * (Phi(x) + x * phi(x)), in one fused pass over the saved input.
    Autodiff through erf gives XLA:CPU five passes over the (tokens, hidden) activation, plus
    the erf polynomial again in the weight-gradient's operand. Same-process A/B of the
    batch-16 train step: ConvNeXt-T 8% faster, ViT-S ~1%.
    """
    return (_gelu_cdf(x) * x.astype(jnp.float32)).astype(x.dtype)


def _gelu_cdf(x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)), in float32."""
    return 0.5 * (1.0 + jax.lax.erf(x.astype(jnp.float32) * (1.0 / math.sqrt(2.0))))


def _gelu_exact_fwd(x):
    return gelu_exact(x), x


def _gelu_exact_bwd(x, g):
    xf = x.astype(jnp.float32)
    cdf = _gelu_cdf(xf)
    pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


# ---------------------------------------------------------------------------------------------
# Layer constructors shared by ConvNeXt and ViT (parameter names and shapes are timm's).


def kernel_init(sharding: tuple[str | None, ...], init=None):
    """timm's trunc_normal(std=.02) (or `init`), annotated for FSDP.

    No eager sharding: models are also built outside any mesh (tests, conversion), and
    `bgjax.parallel` places parameters itself, dropping axes the mesh cannot divide.
    """
    init = init or nnx.initializers.truncated_normal(stddev=0.02)
    return nnx.with_partitioning(init, sharding, eager_sharding=False)


def layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> LayerNorm:
    # Two-pass variance, like torch: the one-pass E[x^2]-E[x]^2 loses ~1e-4 on large activations.
    return LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` over the last axis (same parameters, same values) with a hand-written
    gradient: the standard closed form from the saved normalised rows and 1/std.

    Autodiff of nnx's LayerNorm costs 5.3 ms fwd+bwd for ViT-S's (16, 197, 384) on 2 CPU cores
    and 34 ms for ConvNeXt-T's (16, 56, 56, 96) (torch: 1.05 / 6.1 ms). This one: 2.1 / 9-14 ms.
    On the CPU the row means are matmuls with a 1/C column (`_row_mean`): XLA:CPU's own
    reductions over a short last axis (96 channels) run several times slower.
    """

    def __call__(self, x, *, mask=None):
        last = (x.ndim - 1,)
        plain = self.reduction_axes in (-1, last) and self.feature_axes in (-1, last)
        if mask is not None or self.scale is None or self.bias is None or not plain:
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return _layer_norm(self.epsilon, x, scale, bias)


def _row_mean(rows: jax.Array) -> jax.Array:
    """Mean over the last axis of (R, C) float32 rows, kept as (R, 1)."""
    if jax.default_backend() != "cpu":
        return rows.mean(-1, keepdims=True)
    column = jnp.full((rows.shape[-1], 1), 1.0 / rows.shape[-1], rows.dtype)
    return jnp.matmul(rows, column, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm(epsilon: float, x, scale, bias):
    return _layer_norm_fwd(epsilon, x, scale, bias)[0]


def _layer_norm_fwd(epsilon: float, x, scale, bias):
    # Statistics and arithmetic in float32 whatever the compute dtype, as nnx does.
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    centred = rows - _row_mean(rows)
    inv_std = jax.lax.rsqrt(_row_mean(centred * centred) + epsilon)
    normed = centred * inv_std
    out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.reshape(x.shape).astype(x.dtype), (normed, inv_std, scale, bias)


def _layer_norm_bwd(epsilon: float, residuals, grad):
    del epsilon
    normed, inv_std, scale, bias = residuals
    grad_rows = grad.reshape(normed.shape).astype(jnp.float32)
    grad_normed = grad_rows * scale.astype(jnp.float32)
    grad_x = inv_std * (
        grad_normed - _row_mean(grad_normed) - normed * _row_mean(grad_normed * normed)
    )
    return (
        grad_x.reshape(grad.shape).astype(grad.dtype),
        (grad_rows * normed).sum(0).astype(scale.dtype),
        grad_rows.sum(0).astype(bias.dtype),
    )


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dense(cin: int, cout: int, dtype, rngs: nnx.Rngs, *, shard_in: bool = False) -> nnx.Linear:
    """A linear layer over the last dim, FSDP-sharded on its output (or `shard_in`: input) dim."""
    sharding = ("fsdp", None) if shard_in else (None, "fsdp")
    return nnx.Linear(
        cin,
        cout,
        dtype=dtype,
        kernel_init=kernel_init(sharding),
        dot_general=rows_dot_general,  # (B, N, C) or (B, H, W, C) rows as one 2-D matmul
        rngs=rngs,
    )


def patchify_conv(
    cin: int, cout: int, size: int, dtype, rngs: nnx.Rngs, *, shard_in: bool = False, init=None
) -> nnx.Conv:
    """A non-overlapping size×size/size convolution (stems, ConvNeXt downsampling and 1×1
    conv-MLP, ViT patch embedding), FSDP-sharded on its output (or `shard_in`: input) dim."""
    sharding = (None, None, "fsdp", None) if shard_in else (None, None, None, "fsdp")
    return nnx.Conv(
        cin,
        cout,
        (size, size),
        strides=size,
        padding="VALID",
        dtype=dtype,
        kernel_init=kernel_init(sharding, init),
        conv_general_dilated=patch_conv,  # as one matmul (fast on CPU too)
        rngs=rngs,
    )


def path_has_prefix(prefixes: tuple[tuple[str, ...], ...], path, _value) -> bool:
    """Whether an nnx state `path` starts with one of `prefixes` (use with functools.partial)."""
    keys = tuple(str(p) for p in path)
    return any(keys[: len(p)] == p for p in prefixes)
