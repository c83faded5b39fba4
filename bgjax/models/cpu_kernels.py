"""The models' CPU lowerings, behind one switch chosen once per model (`config.model.kernels`).

Every op a layer computes (`Ops`) has two implementations that give the same values, up to the
order of floating-point sums:

    "xla"   the plain JAX ops (`lax.dot_general`, `lax.conv_general_dilated`, a grouped
            convolution, LayerNorm as nnx computes it, `jax.nn.gelu`, attention with a
            gradient whose matmuls stay in the compute dtype), which accelerators run fast;
    "cpu"   rewrites that XLA:CPU runs faster, most with a hand-written gradient; each is
            measured (2-core CPU, batch 16, fwd+bwd) in BENCHMARKS.md;
    "auto"  "cpu" on the CPU backend, "xla" on any other.

`ops(kernels)` resolves the choice once, when a model is built (the only place the backend is
read), and the model hands the `Ops` to its layers, which call one function per op. Parameters do
not depend on the choice: dense and patchify layers stay `nnx.Linear` / `nnx.Conv` with timm's
names and shapes, and take the lowering through Flax's pluggable `dot_general` /
`conv_general_dilated`. Two knobs replace one op of the set: `dw_impl` (grouped or shifted
depthwise conv, e.g. to compare them: `benchmarks/depthwise.py`) and `attn_impl`
(`jax.nn.dot_product_attention`'s backend, e.g. cuDNN's fused kernel). The depthwise conv's two
lowerings live in `depthwise`; the other ops' are here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.models import depthwise

KERNELS = ("auto", "xla", "cpu")
DW_IMPLS = ("auto", "shifted", "grouped")
# jax.nn.dot_product_attention backends: None keeps the kernel set's attention, "cudnn" is the
# fused flash kernel on NVIDIA GPUs (bf16/fp16 only).
ATTN_IMPLS = (None, "xla", "cudnn")
# config.model.attention / the ViT's `attn_impl`: "auto" resolves by backend and dtype.
ATTENTION_CHOICES = ("auto", *ATTN_IMPLS)
# config.model.dtype: "auto" is bf16 compute on accelerators, fp32 on the CPU.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Ops:
    """One lowering per op; `name` is the resolved kernel set ("xla" or "cpu")."""

    name: str
    dot_general: Callable  # lax.dot_general's signature (nnx.Linear's `dot_general`)
    conv: Callable  # lax.conv_general_dilated's signature (nnx.Conv's `conv_general_dilated`)
    depthwise_conv: Callable  # (x NHWC, kernel [k, k, 1, C]) -> 'SAME' depthwise conv, stride 1
    layer_norm: Callable  # (x, scale, bias, *, epsilon) -> normalised over the last axis
    gelu: Callable  # exact (erf) GELU, torch's default
    attention: Callable  # (q, k, v, *, mask) like jax.nn.dot_product_attention


def resolve(kernels: str) -> str:
    """ "auto" -> "cpu" on the CPU backend, else "xla"; "xla" / "cpu" as given."""
    if kernels not in KERNELS:
        raise ValueError(
            f"unknown kernels {kernels!r} (config key model.kernels); expected one of {KERNELS}"
        )
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def resolve_dtype(dtype) -> jnp.dtype:
    """The compute dtype: "auto" -> bfloat16 on GPU / TPU (parameters and optimizer state stay
    float32), float32 on the CPU (no fast bf16 matmuls there); a dtype name as given."""
    if isinstance(dtype, str) and dtype not in DTYPE_CHOICES:
        raise ValueError(
            f"unknown dtype {dtype!r} (config key model.dtype); expected one of {DTYPE_CHOICES}"
        )
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def _has_cudnn() -> bool:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version


def resolve_attention(attn_impl: str | None, dtype) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation, or None for the kernel set's attention:
    "auto" -> "cudnn" (fused flash attention) on NVIDIA GPUs in bf16/fp16, else None."""
    if attn_impl not in ATTENTION_CHOICES:
        raise ValueError(
            f"unknown attention {attn_impl!r} (config key model.attention); "
            f"expected one of {ATTENTION_CHOICES}"
        )
    half = jnp.dtype(dtype) in _HALF
    if attn_impl == "auto":
        return "cudnn" if half and _has_cudnn() else None
    if attn_impl == "cudnn" and not half:
        raise ValueError(
            f"attention 'cudnn' computes in bfloat16/float16, not {jnp.dtype(dtype).name} "
            "(set model.dtype=bfloat16 or model.attention=auto)"
        )
    return attn_impl


def ops(kernels: str = "auto", *, dw_impl: str = "auto", attn_impl: str | None = None) -> Ops:
    """The op set a model's layers use, resolved now; `dw_impl` / `attn_impl` replace one op."""
    if dw_impl not in DW_IMPLS:
        raise ValueError(f"unknown dw_impl {dw_impl!r}; expected one of {DW_IMPLS}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTN_IMPLS}")
    chosen = _OPS[resolve(kernels)]
    if dw_impl != "auto":
        chosen = dataclasses.replace(chosen, depthwise_conv=_DEPTHWISE[dw_impl])
    if attn_impl is not None:
        chosen = dataclasses.replace(chosen, attention=_ATTENTION[attn_impl])
    return chosen


# ---------------------------------------------------------------------------------------------
# "xla": the plain ops.


def layer_norm(x, scale, bias, *, epsilon: float):
    """LayerNorm over the last axis as nnx computes it: float32, two-pass variance."""
    xf = x.astype(jnp.float32)
    centred = xf - xf.mean(-1, keepdims=True)
    inv_std = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + epsilon)
    out = centred * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


# ---------------------------------------------------------------------------------------------
# "cpu": dense layers and patchify convolutions as 2-D matmuls.


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """`lax.dot_general` that runs a (..., K) x (K, N) product on the rows flattened to 2-D.

    Given the rank-3/4 form, XLA:CPU transposes the whole output gradient before the
    weight-gradient matmul: 2.4x slower for a ConvNeXt-T stage-1 MLP layer.
    """
    (lhs_contract, rhs_contract), batch = dimension_numbers
    plain = lhs_contract == (lhs.ndim - 1,) and rhs_contract == (0,) and batch == ((), ())
    if not plain or lhs.ndim <= 2 or rhs.ndim != 2 or kwargs.get("out_sharding") is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    kwargs.pop("out_sharding", None)
    rows = lhs.reshape(-1, lhs.shape[-1])  # leading dims are contiguous: a bitcast
    out = jax.lax.dot_general(rows, rhs, (((1,), (0,)), ((), ())), precision=precision, **kwargs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])


_NHWC = ("NHWC", "HWIO", "NHWC")


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
    """`lax.conv_general_dilated`, with stride == kernel ("patchify") convs as one matmul.

    Patchify stems, ConvNeXt downsampling and 1x1 convs, ViT patch embedding: 4x faster for the
    ConvNeXt stem, 9x for a ViT-S/16 patch embedding. Other convolutions go to
    `lax.conv_general_dilated` unchanged.
    """
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


# ---------------------------------------------------------------------------------------------
# "cpu": LayerNorm and GELU with one-pass hand-written gradients.


def layer_norm_cpu(x, scale, bias, *, epsilon: float):
    """`layer_norm` with a hand-written gradient (the closed form from the saved normalised rows
    and 1/std) and the row means as matmuls with a 1/C column: XLA:CPU's own reductions over a
    short last axis (96 channels) run several times slower. fwd+bwd on 2 cores, ViT-S's
    (16, 197, 384): autodiff 5.3 ms, this 2.1; ConvNeXt-T's (16, 56, 56, 96): 34 vs 9-14 ms."""
    return _layer_norm(epsilon, x, scale, bias)


def _row_mean(rows: jax.Array) -> jax.Array:
    """Mean over the last axis of (R, C) float32 rows, kept as (R, 1)."""
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
# "cpu": attention with the heads axis first, on batch slices.

# Attention runs on this many batch slices: independent ops, which XLA:CPU runs concurrently on
# its thread pool (YNNPACK runs each batched matmul on one thread), and each slice's
# (heads, T, T) probabilities stay in cache. ViT-S/16 batch-16 CPU train step, A/B in one process
# against the plain autodiff path: 4 slices 6% faster, 1 slice 1%, 8 slices 2%.
ATTN_BATCH_SLICES = 4


def attention_heads_first(q, k, v, mask=None, *, slices: int = ATTN_BATCH_SLICES):
    """softmax(q k^T / sqrt(head_dim)) v for (B, T, heads, head_dim) inputs, computed with the
    heads axis first (as timm does), logits and softmax in float32; `mask` (B, 1, 1, S) True =
    attendable. On CPU faster forward + backward than the XLA path of
    `jax.nn.dot_product_attention`, whose (B, T, N, H) layout costs transposes; the batch is
    split into `slices` pieces, each with a hand-written gradient (`_attention_core`).
    """
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    bounds = np.linspace(0, q.shape[0], min(slices, q.shape[0]) + 1).astype(int)
    outs = [
        _attention_core(q[a:b], k[a:b], v[a:b], None if mask is None else mask[a:b])
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return jnp.swapaxes(out, 1, 2)


def _attention_probs(q, k, mask):
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attention_core(q, k, v, mask):
    """softmax(q k^T) v on (B, heads, T, head_dim) inputs, q already scaled."""
    return _attention_core_fwd(q, k, v, mask)[0]


def _attention_core_fwd(q, k, v, mask):
    probs = _attention_probs(q, k, mask)
    out = jnp.einsum("bnqk,bnkh->bnqh", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _attention_core_bwd(residuals, d_out):
    # The softmax gradient from the saved probabilities and output in one pass,
    # dS = P * (dP - rowsum(dO * O)), instead of autodiff's several passes over (B, N, T, T).
    q, k, v, probs, out = residuals
    d_v = jnp.einsum("bnqk,bnqh->bnkh", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bnqh,bnkh->bnqk", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("bnqk,bnkh->bnqh", d_logits, k)
    d_k = jnp.einsum("bnqk,bnqh->bnkh", d_logits, q)
    return d_q, d_k, d_v.astype(v.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ---------------------------------------------------------------------------------------------
# The two sets, and the ops `dw_impl` / `attn_impl` swap in.

_OPS = {
    "xla": Ops(
        name="xla",
        dot_general=jax.lax.dot_general,
        conv=jax.lax.conv_general_dilated,
        depthwise_conv=depthwise.grouped,
        layer_norm=layer_norm,
        gelu=gelu,
        # Not jax.nn.dot_product_attention's XLA path: its backward multiplies the fp32 logit
        # gradient by bf16 q / k, i.e. fp32 matmuls in a bf16 step; this one casts it first.
        attention=functools.partial(attention_heads_first, slices=1),
    ),
    "cpu": Ops(
        name="cpu",
        dot_general=rows_dot_general,
        conv=patch_conv,
        depthwise_conv=depthwise.shifted,
        layer_norm=layer_norm_cpu,
        gelu=gelu_exact,
        attention=attention_heads_first,
    ),
}
_DEPTHWISE = {"shifted": depthwise.shifted, "grouped": depthwise.grouped}
# Built once, so that models with equal settings have equal (cache-sharing) graph definitions.
_ATTENTION = {
    impl: functools.partial(jax.nn.dot_product_attention, implementation=impl)
    for impl in ATTN_IMPLS
    if impl is not None
}
CUDNN_ATTENTION = _ATTENTION["cudnn"]
