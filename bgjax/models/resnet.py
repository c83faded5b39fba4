"""ResNet (He et al. 2016) and Wide ResNet in Flax NNX, numerically equal to timm's `resnet*`.

Attribute names are timm's module names (`conv1`, `bn1`, `layer2.0.conv3`, `layer2.0.downsample.0`
/ `.1`, `fc`), so `timm_io` converts weights mechanically, BatchNorm running statistics
included (`running_mean` / `running_var`). Images are NHWC. As in timm: the 7x7/2 stem and
3x3/2 max pool, the stride on the bottleneck's 3x3 conv ("v1.5"), a 1x1/2 conv + BN shortcut,
zero-initialised last BN of each block, linear stochastic depth. On top: early / late
background masking (Aniraj et al., ICCVW 2023; the ConvNeXt rule, late after `layer3` or
`layer4`), per-block rematerialisation, a compute dtype separate from the fp32 parameters, FSDP
metadata on kernels, activations pinned to the batch axes after each conv+BN (`constrain_batch`:
under FSDP the partitioner then gathers weights, not activations) and the lowering chosen once
by `kernels` (see `cpu_kernels`).

BatchNorm. Parameters `scale`/`bias` are `nnx.Param`; `running_mean`/`running_var` are
`nnx.BatchStat`, so the trainer's split (`train_state`: trainable params vs the rest) carries
them in `state["rest"]`, which the train step returns updated. In train mode a BN normalises
with the batch's mean and biased variance and moves the running statistics as torch does
(momentum 0.1: new = 0.9 old + 0.1 batch, the variance unbiased by n / (n - 1)); in eval mode
it uses the running statistics. On a data mesh the statistics are synchronised over the data
axis (SyncBN): the train step is one `jax.jit` program over the global batch sharded along
"data", and a mean over the batch axis of a sharded array is the global mean (XLA inserts the
all-reduce), so every device normalises with the same statistics and holds the same running
averages whatever the device count; per-device statistics would make results depend on it.
Gradient accumulation (`optimizer.grad_accum` > 1) is the exception: the trainer runs each
device's micro-batches on its own rows (`train.py`), so there BN sees one device's micro-batch
(torch DDP without SyncBN) and the running statistics are averaged over devices after the step.
`freeze_bn=True` (config `model.freeze_bn`, for fine-tuning): BN uses and keeps the running
statistics in train mode too; its scale and bias still learn (unless the backbone is frozen).
`model.frozen_backbone` alone freezes parameters only: the backbone's BN statistics then still
follow the new data; set both to keep the backbone exactly as loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bgjax.data import IMAGENET_MEAN, IMAGENET_STD
from bgjax.models import cpu_kernels, layers, stacking
from bgjax.models import masking as masking_lib
from bgjax.models.convnext import drop_path_rates
from bgjax.models.cpu_kernels import Ops

BN_MOMENTUM = 0.9  # weight of the old running statistics: torch's momentum=0.1
BN_EPSILON = 1e-5
BLOCKS = ("basic", "bottleneck")


class BatchNorm(nnx.Module):
    """torch's BatchNorm2d over the channels (last axis) of NHWC input."""

    def __init__(self, dim: int, *, scale_init: float = 1.0, dtype=None):
        self.scale = nnx.Param(jnp.full((dim,), scale_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x, *, use_batch_stats: bool):
        dtype = self.dtype or x.dtype
        if use_batch_stats:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # two-pass, like torch
            count = x.size // x.shape[-1]
            unbiased = var * count / max(count - 1, 1)
            old_mean, old_var = self.running_mean[...], self.running_var[...]
            new_mean = BN_MOMENTUM * old_mean + (1 - BN_MOMENTUM) * mean
            new_var = BN_MOMENTUM * old_var + (1 - BN_MOMENTUM) * unbiased
            self.running_mean.set_value(jax.lax.stop_gradient(new_mean))
            self.running_var.set_value(jax.lax.stop_gradient(new_var))
        else:
            mean, var = self.running_mean[...], self.running_var[...]
        inv = self.scale[...] * jax.lax.rsqrt(var + BN_EPSILON)
        shift = self.bias[...] - mean * inv
        return x.astype(dtype) * inv.astype(dtype) + shift.astype(dtype)


def conv(cin: int, cout: int, size: int, stride: int, *, ops: Ops, dtype, rngs: nnx.Rngs):
    """A size x size conv without bias, torch's `padding=size // 2`; timm's init (Kaiming
    normal, fan-out), FSDP-sharded on its output dim."""
    pad = size // 2
    return nnx.Conv(
        cin,
        cout,
        (size, size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=layers.kernel_init(
            (None, None, None, "fsdp"), nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        ),
        conv_general_dilated=ops.conv,
        rngs=rngs,
    )


@functools.cache  # one function per fan-in: equal models keep equal graph definitions
def _torch_linear_bias_init(fan_in: int):
    """torch nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def max_pool_3x3_s2(x):
    """torch's MaxPool2d(3, stride=2, padding=1): the padding never wins the max."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Block(nnx.Module):
    """timm's BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1; `width` inner channels):
    conv_i -> bn_i -> ReLU, the last without ReLU, drop-path, plus the shortcut (`downsample`:
    1x1 conv + BN when the shape changes), then ReLU. The stride is on the first 3x3 conv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        *,
        bottleneck: bool,
        width: int,
        zero_init_last: bool,
        drop_path: float,
        ops: Ops,
        dtype,
        rngs: nnx.Rngs,
    ):
        # (kernel size, output channels, stride) of conv1, conv2[, conv3].
        if bottleneck:
            spec = [(1, width, 1), (3, width, stride), (1, cout, 1)]
        else:
            spec = [(3, cout, stride), (3, cout, 1)]
        self.num_convs = len(spec)
        dims = [cin] + [c for _, c, _ in spec]
        for i, (size, c, s) in enumerate(spec, start=1):
            setattr(
                self, f"conv{i}", conv(dims[i - 1], c, size, s, ops=ops, dtype=dtype, rngs=rngs)
            )
            last = i == len(spec)
            setattr(
                self,
                f"bn{i}",
                BatchNorm(c, scale_init=0.0 if last and zero_init_last else 1.0, dtype=dtype),
            )
        self.downsample = (
            nnx.List(
                [
                    conv(cin, cout, 1, stride, ops=ops, dtype=dtype, rngs=rngs),
                    BatchNorm(cout, dtype=dtype),
                ]
            )
            if stride != 1 or cin != cout
            else None
        )
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None
        )

    def __call__(self, x, *, train: bool = False, bn_train: bool = False):
        y = x
        for i in range(1, self.num_convs + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y), use_batch_stats=bn_train)
            y = layers.constrain_batch(y)
            if i < self.num_convs:
                y = jax.nn.relu(y)
        if self.drop_path is not None:
            y = self.drop_path(y, deterministic=not train)
        shortcut = x
        if self.downsample is not None:
            down_conv, down_bn = self.downsample
            shortcut = down_bn(down_conv(x), use_batch_stats=bn_train)
        return layers.constrain_batch(jax.nn.relu(y + shortcut))


def _run_block(block: Block, x, train: bool, bn_train: bool):
    return block(x, train=train, bn_train=bn_train)


class ResNet(nnx.Module):
    """ResNet with optional early or late background masking.

    `model(x, mask=None, *, train=False)`: x is normalised NHWC float (B, H, W, in_chans), mask
    (B, H, W) foreground in input pixels; required iff `masking != "none"`. num_classes=0
    builds no `fc` (timm's identity): the call returns the pooled features.

    block "basic" (ResNet-18/34) or "bottleneck" (50/101/152); layers: blocks per stage;
    channels: each stage's planes (outputs x4 for bottlenecks); base_width: the bottleneck's
    inner width per 64 planes (128: Wide ResNet-50-2); stem_channels: the stem conv's
    outputs (64 in every timm ResNet with this stem; fewer only for tiny test models).

    masking="early": background pixels become `early_fill` before the stem. masking="late":
    features are multiplied by the mask, nearest-resized to the feature grid, after `layer3`
    (late_stage=3) or `layer4` (4); pooling is `late_pool` ("mean" over all positions, or
    "masked_mean" over foreground positions). freeze_bn: BN uses its running statistics and
    does not update them in train mode (see the module docstring).
    """

    def __init__(
        self,
        *,
        block: str,
        layers: Sequence[int],
        num_classes: int,
        rngs: nnx.Rngs,
        in_chans: int = 3,
        channels: Sequence[int] = (64, 128, 256, 512),
        base_width: int = 64,
        stem_channels: int = 64,
        zero_init_last: bool = True,
        freeze_bn: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dtype=jnp.float32,
        remat: str | bool = "none",
        kernels: str = "auto",
        masking: str = "none",
        early_fill: str = "black",
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        late_stage: int = 3,
        late_pool: str = "mean",
    ):
        if block not in BLOCKS:
            raise ValueError(f"unknown ResNet block {block!r}; expected one of {BLOCKS}")
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError(f"ResNet needs 4 stages; got layers={layers}, channels={channels}")
        masking_lib.check_strategy(masking)
        masking_lib.check_late_options(late_pool, late_stage)
        fill = masking_lib.early_fill_value(early_fill, pixel_mean, pixel_std, in_chans)
        ops = cpu_kernels.ops(kernels)
        dtype = cpu_kernels.resolve_dtype(dtype)  # "auto": bf16 on accelerators
        bottleneck = block == "bottleneck"
        expansion = 4 if bottleneck else 1

        self.num_classes = num_classes
        self.num_features = channels[-1] * expansion
        self.dtype = dtype
        self.masking = masking
        self.early_fill_value = tuple(float(v) for v in fill)  # static: not a parameter
        self.late_stage = late_stage
        self.late_pool = late_pool
        self.freeze_bn = freeze_bn
        self.remat = stacking.remat_policy(remat)  # a stacking.REMAT_POLICIES name
        self.kernels = ops.name

        self.conv1 = conv(in_chans, stem_channels, 7, 2, ops=ops, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(stem_channels, dtype=dtype)
        cin = stem_channels
        for i, (planes, rates) in enumerate(zip(channels, drop_path_rates(drop_path_rate, layers))):
            cout = planes * expansion
            width = planes * base_width // 64
            stage = []
            for j, rate in enumerate(rates):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(
                    Block(cin, cout, stride, bottleneck=bottleneck, width=width,
                          zero_init_last=zero_init_last, drop_path=rate, ops=ops, dtype=dtype,
                          rngs=rngs)
                )  # fmt: skip
                cin = cout
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.drop = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
        self.fc = (
            nnx.Linear(
                self.num_features,
                num_classes,
                # torch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_linear_bias_init(self.num_features),
                dot_general=ops.dot_general,
                rngs=rngs,
            )
            if num_classes
            else None
        )

    def _stages(self) -> tuple[nnx.List, ...]:
        # Not `stages`: Grad-CAM (`analysis.saliency`) takes that name for ConvNeXt's own list.
        return tuple(getattr(self, f"layer{i}") for i in range(1, 5))

    def forward_intermediates(self, x, mask=None, *, train: bool = False) -> dict:
        """Feature maps after the stem's ReLU (`stem`, before the max pool, as timm's first
        intermediate) and after each stage (`layer1`..`layer4`, masked if late masking happens
        there), NHWC in the compute dtype."""
        masking_lib.check_mask(x, mask, self.masking)
        if self.masking == "early":
            x = masking_lib.early_mask(x, mask, jnp.asarray(self.early_fill_value, x.dtype))
        bn_train = train and not self.freeze_bn
        x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype)), use_batch_stats=bn_train))
        x = layers.constrain_batch(x)
        out = {"stem": x}
        x = max_pool_3x3_s2(x)
        run = stacking.with_remat(_run_block, self.remat, static_argnums=(2, 3))
        for i, stage in enumerate(self._stages()):
            for block in stage:
                x = run(block, x, train, bn_train)
            if self.masking == "late" and i == self.late_stage - 1:
                x, _ = masking_lib.late_mask(x, mask)
            out[f"layer{i + 1}"] = x
        return out

    def forward_features(self, x, mask=None, *, train: bool = False):
        """`layer4`'s feature map, before pooling."""
        return self.forward_intermediates(x, mask, train=train)["layer4"]

    def pool(self, features, mask=None):
        """Global average pool to (B, C) in float32 (foreground-only for late masked_mean)."""
        features = features.astype(jnp.float32)
        if self.masking == "late" and self.late_pool == "masked_mean":
            grid = masking_lib.resize_mask_nearest(mask, features.shape[1:3])
            return masking_lib.masked_mean_pool(features, grid)
        return jnp.mean(features, axis=(1, 2))

    def __call__(self, x, mask=None, *, train: bool = False):
        pooled = self.pool(self.forward_features(x, mask, train=train), mask)
        if self.drop is not None:
            pooled = self.drop(pooled, deterministic=not train)
        return pooled if self.fc is None else self.fc(pooled)

    def head_prefixes(self) -> tuple[tuple[str, ...], ...]:
        """What a frozen backbone still trains: `fc`; masked after layer3 also layer4, which
        learns to read the masked features (the ConvNeXt rule)."""
        if self.masking == "late" and self.late_stage < 4:
            return (("fc",), ("layer4",))
        return (("fc",),)

    def frozen_backbone_filter(self):
        """Parameters trained in frozen-backbone mode: those under `head_prefixes()`."""
        return nnx.All(nnx.Param, functools.partial(layers.path_has_prefix, self.head_prefixes()))


# name -> timm's architecture arguments (timm's entry points of the same names).
_ARCHS = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", layers=(3, 8, 36, 3)),
    "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), base_width=128),
}

# Keyword arguments given at the call win, like timm's `create_model(name, layers=...)`.
MODELS = {name: functools.partial(ResNet, **arch) for name, arch in _ARCHS.items()}
