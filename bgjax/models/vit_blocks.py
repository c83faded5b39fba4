"""The layers of a Vision Transformer in timm's module names: `PatchEmbed` (`patch_embed.proj`)
and the pre-norm `Block` (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `ls1.gamma`, ...),
computed with the model's `cpu_kernels.Ops`. `vit.VisionTransformer` assembles them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bgjax.models import cpu_kernels, layers
from bgjax.models.cpu_kernels import Ops


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p/p convolution: (B, H, W, C) -> (B, H//p, W//p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, ops: Ops, dtype, rngs):
        self.proj = layers.patchify_conv(
            in_chans, embed_dim, patch_size, dtype, rngs, ops, init=nnx.initializers.lecun_normal()
        )

    def __call__(self, x):
        return layers.constrain_batch(self.proj(x))


class Attention(nnx.Module):
    """Multi-head self-attention; qkv output ordered [q|k|v] then heads, as timm."""

    def __init__(self, dim: int, num_heads: int, *, ops: Ops, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.ops = ops
        self.qkv = layers.dense(dim, 3 * dim, dtype, rngs, ops)
        self.proj = layers.dense(dim, dim, dtype, rngs, ops, shard_in=True)

    def __call__(self, x, key_mask=None):
        b, n, d = x.shape
        # Pinned to the batch axes: the FSDP-sharded qkv would otherwise shard heads.
        qkv = layers.constrain_batch(self.qkv(x))
        qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # key_mask (B, S) bool: True = attendable; broadcast over heads (and queries: cuDNN
        # takes the mask as a (B, 1, T, S) bias and refuses a broadcast query dim).
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if mask is not None and self.ops.attention is cpu_kernels.CUDNN_ATTENTION:
            mask = jnp.broadcast_to(mask, (b, 1, n, n))
        out = self.ops.attention(q, k, v, mask=mask)  # scale head_dim**-0.5
        return self.proj(layers.constrain_batch(out.reshape(b, n, d)))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2, or (`gated`, timm's SwiGLUPacked) fc1 -> SiLU(a) * b -> fc2."""

    def __init__(self, dim: int, hidden: int, *, gated: bool, ops: Ops, dtype, rngs: nnx.Rngs):
        if gated and hidden % 2:
            raise ValueError(f"a gated MLP needs an even hidden width, got {hidden}")
        self.gated = gated
        self.ops = ops
        self.fc1 = layers.dense(dim, hidden, dtype, rngs, ops)
        fc2_in = hidden // 2 if gated else hidden
        self.fc2 = layers.dense(fc2_in, dim, dtype, rngs, ops, shard_in=True)

    def __call__(self, x):
        x = layers.constrain_batch(self.fc1(x))
        if self.gated:
            a, b = jnp.split(x, 2, axis=-1)
            x = jax.nn.silu(a) * b
        else:
            x = self.ops.gelu(x)
        return self.fc2(x)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_values: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), with drop-path."""

    drop_path_calls = 2  # one stochastic-depth mask per residual branch (`stacking`)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        gated_mlp: bool,
        init_values: float | None,
        drop_path: float,
        ops: Ops,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.norm1 = layers.layer_norm(dim, dtype, rngs, ops)
        self.attn = Attention(dim, num_heads, ops=ops, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(dim, init_values) if init_values else None
        self.norm2 = layers.layer_norm(dim, dtype, rngs, ops)
        self.mlp = Mlp(dim, mlp_hidden, gated=gated_mlp, ops=ops, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, init_values) if init_values else None
        # Stochastic depth: one keep/drop draw per sample, survivors scaled by 1/(1-rate).
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs) if drop_path > 0 else None
        )

    def _drop_path(self, y, train: bool):
        return y if self.drop_path is None else self.drop_path(y, deterministic=not train)

    @staticmethod
    def _branch(y, layer_scale, drop):
        return drop(y if layer_scale is None else layer_scale(y))

    def __call__(self, x, key_mask=None, *, train: bool = False, drop=None):
        """drop: replaces the block's own drop path (a scan passes each step's, `stacking`)."""
        if drop is None:
            drop = functools.partial(self._drop_path, train=train)
        x = x + self._branch(self.attn(self.norm1(x), key_mask), self.ls1, drop)
        return x + self._branch(self.mlp(self.norm2(x)), self.ls2, drop)
