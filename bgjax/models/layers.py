"""The layer constructors ConvNeXt and ViT share, with timm's parameter names and shapes.

`kernel_init`: timm's initialisation with FSDP metadata on one large kernel dim. `layer_norm`,
`dense`, `patchify_conv`: layers that compute with the model's `cpu_kernels.Ops` (chosen once,
when the model is built). `constrain_batch`: the activation sharding at block boundaries.
`path_has_prefix`: the path test of the frozen-backbone filters.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax.models.cpu_kernels import Ops


def kernel_init(sharding: tuple[str | None, ...], init=None):
    """timm's trunc_normal(std=.02) (or `init`), annotated for FSDP.

    No eager sharding: models are also built outside any mesh (tests, conversion), and
    `bgjax.parallel` places parameters itself, dropping axes the mesh cannot divide.
    """
    init = init or nnx.initializers.truncated_normal(stddev=0.02)
    return nnx.with_partitioning(init, sharding, eager_sharding=False)


def layer_norm(dim: int, dtype, rngs: nnx.Rngs, ops: Ops) -> LayerNorm:
    # Two-pass variance, like torch: the one-pass E[x^2]-E[x]^2 loses ~1e-4 on large activations.
    return LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=rngs, ops=ops)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters, same values) computed over the last axis by
    `ops.layer_norm`."""

    def __init__(self, *args, ops: Ops, **kwargs):
        super().__init__(*args, **kwargs)
        self.ops = ops

    def __call__(self, x, *, mask=None):
        last = (x.ndim - 1,)
        plain = self.reduction_axes in (-1, last) and self.feature_axes in (-1, last)
        if mask is not None or self.scale is None or self.bias is None or not plain:
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return self.ops.layer_norm(x, scale, bias, epsilon=self.epsilon)


def dense(
    cin: int, cout: int, dtype, rngs: nnx.Rngs, ops: Ops, *, shard_in: bool = False
) -> nnx.Linear:
    """A linear layer over the last dim, FSDP-sharded on its output (or `shard_in`: input) dim."""
    sharding = ("fsdp", None) if shard_in else (None, "fsdp")
    return nnx.Linear(
        cin,
        cout,
        dtype=dtype,
        kernel_init=kernel_init(sharding),
        dot_general=ops.dot_general,
        rngs=rngs,
    )


def patchify_conv(
    cin: int,
    cout: int,
    size: int,
    dtype,
    rngs: nnx.Rngs,
    ops: Ops,
    *,
    shard_in: bool = False,
    init=None,
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
        conv_general_dilated=ops.conv,
        rngs=rngs,
    )


def constrain_batch(x):
    """`x` with its batch dim pinned over the mesh axes in context (the train step's), as
    big_vision and MaxText pin activations at block boundaries: under FSDP the partitioner then
    gathers weights rather than activations. A no-op outside a mesh context (evaluation, tests),
    inside shard_map (manual axes) and when the batch does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def path_has_prefix(prefixes: tuple[tuple[str, ...], ...], path, _value) -> bool:
    """Whether an nnx state `path` starts with one of `prefixes` (use with functools.partial)."""
    keys = tuple(str(p) for p in path)
    return any(keys[: len(p)] == p for p in prefixes)
