"""ConvNeXt (Liu et al. 2022) in Flax NNX, numerically equal to timm's `convnext_*`.

Attribute names are timm's module names (`stem.0`, `stages.1.downsample.1`,
`stages.2.blocks.3.mlp.fc1`, `head.fc`, ...), so `timm_io` converts weights mechanically. Images
are NHWC. On top of timm's model: early / late background masking (Aniraj et al., ICCVW
2023), named rematerialisation policies and scanning over each stage's blocks (`stacking`), a
compute dtype separate from the fp32 parameters, FSDP partitioning metadata on kernels, and the
lowering of each op chosen once by `kernels` ("auto" | "xla" | "cpu", see `cpu_kernels`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax.data import IMAGENET_MEAN, IMAGENET_STD
from bgjax.models import cpu_kernels, layers, stacking
from bgjax.models import masking as masking_lib
from bgjax.models.cpu_kernels import Ops


class DepthwiseConv(nnx.Module):
    """timm's `conv_dw`: k×k depthwise conv, stride 1, 'same' padding; kernel [k, k, 1, C]."""

    def __init__(self, dim: int, kernel_size: int = 7, *, ops: Ops, dtype=None, rngs):
        shape = (kernel_size, kernel_size, 1, dim)
        self.kernel = nnx.Param(
            layers.kernel_init((None, None, None, "fsdp"))(rngs.params(), shape)
        )
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.ops = ops
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x, kernel, bias = (a.astype(dtype) for a in (x, self.kernel[...], self.bias[...]))
        return self.ops.depthwise_conv(x, kernel) + bias


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2; `conv=True` mirrors timm's conv_mlp (1×1 convs, same names)."""

    def __init__(self, dim: int, hidden: int, *, conv: bool, ops: Ops, dtype, rngs: nnx.Rngs):
        layer = functools.partial(layers.patchify_conv, size=1) if conv else layers.dense
        self.fc1 = layer(dim, hidden, dtype=dtype, rngs=rngs, ops=ops)
        self.fc2 = layer(hidden, dim, dtype=dtype, rngs=rngs, ops=ops, shard_in=True)
        self.ops = ops

    def __call__(self, x):
        # Pinned to the batch axes: FSDP-sharded fc1 would otherwise shard the hidden features.
        return self.fc2(layers.constrain_batch(self.ops.gelu(self.fc1(x))))


class Block(nnx.Module):
    """conv_dw -> norm -> mlp -> layer-scale gamma -> drop-path, plus the residual."""

    drop_path_calls = 1  # stochastic-depth masks per call (`stacking`)

    def __init__(
        self,
        dim: int,
        *,
        conv_mlp: bool,
        ls_init_value: float | None,
        drop_path: float,
        ops: Ops,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.conv_dw = DepthwiseConv(dim, ops=ops, dtype=dtype, rngs=rngs)
        self.norm = layers.layer_norm(dim, dtype, rngs, ops)
        self.mlp = Mlp(dim, 4 * dim, conv=conv_mlp, ops=ops, dtype=dtype, rngs=rngs)
        self.gamma = (
            nnx.Param(jnp.full((dim,), ls_init_value, jnp.float32))
            if ls_init_value is not None
            else None
        )
        # Stochastic depth: one keep/drop draw per sample, survivors scaled by 1/(1-rate).
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None
        )

    def __call__(self, x, *, train: bool = False, drop=None):
        """drop: replaces the block's own drop path (a scan passes each step's, `stacking`)."""
        y = self.mlp(self.norm(layers.constrain_batch(self.conv_dw(x))))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        if drop is not None:
            y = drop(y)
        elif self.drop_path is not None:
            y = self.drop_path(y, deterministic=not train)
        return x + y


class Stage(nnx.Module):
    """Optional downsample (LayerNorm + 2×2/2 conv) followed by `depth` blocks, under the
    `stacking` remat policy `remat`; `scan_blocks`: stored as one `stacking.Stack`, run as one
    `lax.scan`."""

    def __init__(
        self,
        cin: int,
        cout: int,
        drop_path_rates: Sequence[float],
        *,
        downsample: bool,
        remat: str | bool = "none",
        scan_blocks: bool = False,
        ops: Ops,
        dtype,
        rngs: nnx.Rngs,
        **block_kwargs,
    ):
        self.downsample = (
            nnx.List(
                [
                    layers.layer_norm(cin, dtype, rngs, ops),
                    layers.patchify_conv(cin, cout, 2, dtype, rngs, ops),
                ]
            )
            if downsample
            else None
        )
        self.dim = cout
        block = functools.partial(Block, cout, ops=ops, dtype=dtype, **block_kwargs)
        self.blocks = stacking.build_blocks(
            block,
            drop_path_rates,
            scan=scan_blocks,
            drop_path_calls=Block.drop_path_calls,
            rngs=rngs,
        )
        self.remat = stacking.remat_policy(remat)

    def __call__(self, x, *, train: bool = False):
        for layer in self.downsample or ():
            x = layers.constrain_batch(layer(x))

        def apply(block, x, drop):
            return layers.constrain_batch(block(x, train=train, drop=drop))

        x, _ = stacking.run_blocks(self.blocks, x, apply, remat=self.remat, train=train)
        return x


class Head(nnx.Module):
    """timm's NormMlpClassifierHead without hidden layer: (pooled) -> norm -> dropout -> fc.
    num_classes=0: no `fc` (timm's identity), the normalised pooled features come out.

    Computed in float32 whatever the backbone's dtype: it is tiny and the logits feed the loss.
    """

    def __init__(self, dim: int, num_classes: int, drop_rate: float, *, ops: Ops, rngs: nnx.Rngs):
        self.norm = layers.layer_norm(dim, jnp.float32, rngs, ops)
        self.drop = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.fc = nnx.Linear(dim, num_classes, kernel_init=init, rngs=rngs) if num_classes else None

    def __call__(self, pooled, *, train: bool = False):
        x = self.norm(pooled.astype(jnp.float32))
        if self.drop is not None:
            x = self.drop(x, deterministic=not train)
        return x if self.fc is None else self.fc(x)


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Rates rising linearly from 0 over all blocks, split per stage (as timm)."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    bounds = np.cumsum([0, *depths])
    return [rates[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ConvNeXt(nnx.Module):
    """ConvNeXt with optional early or late background masking.

    `model(x, mask=None, *, train=False)`: x is normalised NHWC float (B, H, W, in_chans),
    mask (B, H, W) foreground in input pixels; required iff `masking != "none"`. As in timm,
    num_classes=0 builds no classifier: the call returns the head's normalised pooled features.

    masking="early": background pixels become `early_fill` ("black" = pixel 0 after
    normalisation with `pixel_mean`/`pixel_std`, "mean" = 0) before the stem.
    masking="late": features are multiplied by the mask, nearest-resized to the feature grid,
    after stage `late_stage` (3: third stage, the paper's default; 4: the last one); pooling is
    `late_pool` ("mean": over all positions, zeros included, as the paper; "masked_mean": over
    foreground positions only).

    patch_size: the stem's stride (timm's `patch_size`; 4 in every released ConvNeXt). A finer
    stem gives small images a finer feature grid (late masking needs one to outline objects).

    kernels: each op's lowering ("auto": the CPU ones on the CPU backend, see `cpu_kernels`),
    resolved here, once; `dw_impl` ("shifted" | "grouped") overrides the depthwise conv's.
    remat: a `stacking.REMAT_POLICIES` name (or True / False); scan_blocks: each stage's blocks
    are stored as one `stacking.Stack` (`stages.2.blocks.stacked.mlp.fc1`, a leading block
    axis) and run as one `lax.scan`; `timm_io` keeps timm's per-block names.
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        dims: Sequence[int],
        num_classes: int,
        rngs: nnx.Rngs,
        in_chans: int = 3,
        patch_size: int = 4,
        conv_mlp: bool = False,
        ls_init_value: float | None = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dtype=jnp.float32,
        remat: str | bool = "none",
        scan_blocks: bool = False,
        kernels: str = "auto",
        dw_impl: str = "auto",
        masking: str = "none",
        early_fill: str = "black",
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        late_stage: int = 3,
        late_pool: str = "mean",
    ):
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages; got depths={depths}, dims={dims}")
        masking_lib.check_strategy(masking)
        masking_lib.check_late_options(late_pool, late_stage)
        fill = masking_lib.early_fill_value(early_fill, pixel_mean, pixel_std, in_chans)
        ops = cpu_kernels.ops(kernels, dw_impl=dw_impl)
        dtype = cpu_kernels.resolve_dtype(dtype)  # "auto": bf16 on accelerators

        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.dtype = dtype
        self.masking = masking
        self.early_fill_value = tuple(float(v) for v in fill)  # static: not a parameter
        self.late_stage = late_stage
        self.late_pool = late_pool
        self.kernels = ops.name

        self.stem = nnx.List(
            [
                layers.patchify_conv(in_chans, dims[0], patch_size, dtype, rngs, ops),
                layers.layer_norm(dims[0], dtype, rngs, ops),
            ]
        )
        stage_kwargs = dict(
            remat=remat,
            scan_blocks=scan_blocks,
            ops=ops,
            dtype=dtype,
            rngs=rngs,
            conv_mlp=conv_mlp,
            ls_init_value=ls_init_value,
        )
        rates = drop_path_rates(drop_path_rate, depths)
        cins = (dims[0], *dims[:-1])
        self.stages = nnx.List(
            [
                Stage(cin, cout, r, downsample=i > 0, **stage_kwargs)
                for i, (cin, cout, r) in enumerate(zip(cins, dims, rates))
            ]
        )
        self.head = Head(dims[-1], num_classes, drop_rate, ops=ops, rngs=rngs)

    def forward_intermediates(self, x, mask=None, *, train: bool = False) -> dict:
        """Feature maps after the stem and after each stage (`stages.i`, masked if late
        masking happens there), NHWC in the compute dtype."""
        masking_lib.check_mask(x, mask, self.masking)
        if self.masking == "early":
            x = masking_lib.early_mask(x, mask, jnp.asarray(self.early_fill_value, x.dtype))
        x = x.astype(self.dtype)
        for layer in self.stem:
            x = layers.constrain_batch(layer(x))
        out = {"stem": x}
        for i, stage in enumerate(self.stages):
            x = stage(x, train=train)
            if self.masking == "late" and i == self.late_stage - 1:
                x, _ = masking_lib.late_mask(x, mask)
            out[f"stages.{i}"] = x
        return out

    def forward_features(self, x, mask=None, *, train: bool = False):
        """The last stage's feature map, before pooling."""
        return self.forward_intermediates(x, mask, train=train)[f"stages.{len(self.stages) - 1}"]

    def pool(self, features, mask=None):
        """Global average pool to (B, C) in float32 (foreground-only for late masked_mean)."""
        features = features.astype(jnp.float32)
        if self.masking == "late" and self.late_pool == "masked_mean":
            grid = masking_lib.resize_mask_nearest(mask, features.shape[1:3])
            return masking_lib.masked_mean_pool(features, grid)
        return jnp.mean(features, axis=(1, 2))

    def __call__(self, x, mask=None, *, train: bool = False):
        features = self.forward_features(x, mask, train=train)
        return self.head(self.pool(features, mask), train=train)

    def head_prefixes(self) -> tuple[tuple[str, ...], ...]:
        """What the masking paper's code trains afresh: the head (norm + fc); masked after
        stage 3 also the last stage, which learns to read the masked features."""
        if self.masking == "late" and self.late_stage < len(self.stages):
            return (("head",), ("stages", str(len(self.stages) - 1)))
        return (("head",),)

    def frozen_backbone_filter(self):
        """Parameters trained in frozen-backbone mode: those under `head_prefixes()`."""
        return nnx.All(nnx.Param, functools.partial(layers.path_has_prefix, self.head_prefixes()))


# name -> timm's architecture arguments (timm's `convnext_*` entry points).
_ARCHS = {
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnext_xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
}


# Keyword arguments given at the call win, like timm's `create_model(name, depths=..., dims=...)`.
MODELS = {name: functools.partial(ConvNeXt, **arch) for name, arch in _ARCHS.items()}
