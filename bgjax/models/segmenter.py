"""The binary foreground segmenter that supplies masks at test time (Aniraj et al., ICCVW 2023).

The masking paper predicts the object mask with a segmentation network (theirs: Mask2Former)
instead of reading it from annotations; that is what makes early masking usable on real photos.
Ours is a timm encoder from `bgjax.models` (any ConvNeXt or ViT, importable from timm weights)
under a light decoder:

    ConvNeXt  stage maps at strides 4, 8, 16, 32 --+
    ViT       patch-token grid at stride p --------+-> FPN-lite: 1x1 laterals, top-down sum
                                                   -> resize to stride 4, 3x3 conv + LN + GELU
                                                   -> bilinear to full size, concat with a 3x3
                                                      conv of the image (crisp edges)
                                                   -> 3x3 conv + GELU -> 1x1 conv -> logit

`model(x, mask=None, *, train=False)` -> (B, H, W) float32 foreground logits for normalised NHWC
`x`; `mask` is accepted (and ignored) so the segmenter fits the classifiers' call signature.

Parameters: `encoder.*` are timm's names (`load_timm_encoder` loads a timm checkpoint of the
encoder's architecture into `model.encoder`; the encoder is headless), `decoder.*` are ours.

Also here, as pure jnp functions with `valid` weighting of the rows of a batch (padding rows of
the last eval batch count for nothing): the training loss (per-pixel BCE + optional soft dice)
and the metrics (foreground / background IoU, their mean, pixel accuracy), accumulated over a
dataset as confusion counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bgjax import models
from bgjax.models import cpu_kernels, timm_io
from bgjax.models.convnext import ConvNeXt
from bgjax.models.vit import VisionTransformer

DECODER_STRIDE = 4  # where the pyramid is fused (ConvNeXt's finest stage)


def _conv(cin: int, cout: int, size: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A 'SAME' stride-1 conv; FSDP metadata on the output dim (parallel drops it if it must)."""
    init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), (None, None, None, "fsdp"), eager_sharding=False
    )
    return nnx.Conv(cin, cout, (size, size), dtype=dtype, kernel_init=init, rngs=rngs)


def _resize(x, size: Sequence[int]):
    """Bilinear resize of NHWC `x` to spatial `size` (a no-op when it already has it)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear")


def encoder_feature_dims(encoder: nnx.Module) -> tuple[int, ...]:
    """Channels of the maps `encoder_features` returns, coarsest first."""
    if isinstance(encoder, ConvNeXt):
        return tuple(stage.dim for stage in reversed(encoder.stages))
    if isinstance(encoder, VisionTransformer):
        return (encoder.embed_dim,)
    raise TypeError(f"no segmentation features for encoder {type(encoder).__name__}")


def encoder_features(encoder: nnx.Module, x, *, train: bool) -> list[jax.Array]:
    """NHWC feature maps, coarsest first: ConvNeXt's four stage outputs, or ViT's patch tokens
    (after the final norm) laid back on their grid."""
    if isinstance(encoder, ConvNeXt):
        maps = encoder.forward_intermediates(x, train=train)
        return [maps[f"stages.{i}"] for i in reversed(range(len(encoder.stages)))]
    if isinstance(encoder, VisionTransformer):
        tokens = encoder.forward_features(x, train=train)
        h, w = x.shape[1] // encoder.patch_size, x.shape[2] // encoder.patch_size
        patches = tokens[:, encoder.num_prefix_tokens :]
        return [patches.reshape(x.shape[0], h, w, patches.shape[-1])]
    raise TypeError(f"no segmentation features for encoder {type(encoder).__name__}")


class Decoder(nnx.Module):
    """FPN-lite over the encoder maps, then a full-resolution refinement with image features."""

    def __init__(
        self,
        feature_dims: Sequence[int],
        *,
        dim: int,
        refine_dim: int,
        in_chans: int = 3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.lateral = nnx.List([_conv(c, dim, 1, dtype, rngs) for c in feature_dims])
        self.fuse = _conv(dim, dim, 3, dtype, rngs)
        self.fuse_norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.image_stem = _conv(in_chans, refine_dim, 3, dtype, rngs)
        self.refine = _conv(dim + refine_dim, refine_dim, 3, dtype, rngs)
        self.out = _conv(refine_dim, 1, 1, dtype, rngs)

    def __call__(self, features: Sequence[jax.Array], image):
        x = None
        for lateral, feature in zip(self.lateral, features):
            y = lateral(feature)
            x = y if x is None else y + _resize(x, y.shape[1:3])
        height, width = image.shape[1:3]
        x = _resize(x, (height // DECODER_STRIDE, width // DECODER_STRIDE))
        x = jax.nn.gelu(self.fuse_norm(self.fuse(x)), approximate=False)
        x = _resize(x, (height, width))
        edges = jax.nn.gelu(self.image_stem(image.astype(x.dtype)), approximate=False)
        x = jax.nn.gelu(self.refine(jnp.concatenate([x, edges], axis=-1)), approximate=False)
        return self.out(x)[..., 0].astype(jnp.float32)


class Segmenter(nnx.Module):
    """Binary foreground segmenter: `encoder` (a `bgjax.models` model) + `Decoder`.

    encoder: a model name for `bgjax.models.create` (built headless, `encoder_overrides` go to
    it: depths/dims, img_size/patch_size, dtype, drop_path_rate, remat, ...), or an already
    built encoder module, e.g. `models.from_timm("convnext_tiny", "weights.safetensors")`.
    kernels: the op lowerings of an encoder built by name (see `cpu_kernels`), resolved here,
    once; the decoder uses the plain ops.
    """

    masking = "none"  # takes no mask: evaluation code passes none

    def __init__(
        self,
        encoder: str | nnx.Module,
        *,
        rngs: nnx.Rngs,
        decoder_dim: int = 64,
        refine_dim: int = 16,
        dtype=jnp.float32,
        kernels: str = "auto",
        **encoder_overrides,
    ):
        kernels = cpu_kernels.resolve(kernels)
        if isinstance(encoder, str):
            encoder_overrides.setdefault("masking", "none")
            if encoder_overrides["masking"] != "none":
                raise ValueError(
                    f"the segmenter's encoder takes no mask; got masking="
                    f"{encoder_overrides['masking']!r} (set config.model.masking='none')"
                )
            encoder = models.create(
                encoder, 0, rngs=rngs, dtype=dtype, kernels=kernels, **encoder_overrides
            )
        elif encoder_overrides:
            raise ValueError(
                f"overrides {sorted(encoder_overrides)} apply to an encoder built by name, not "
                "to a given module"
            )
        # Headless: the decoder reads feature maps, not pooled features, so even a num_classes=0
        # head (ConvNeXt's `head.norm`) would be parameters nothing uses or trains.
        if getattr(encoder, "head", None) is not None:
            encoder.head = None
        self.encoder = encoder
        in_chans = getattr(encoder, "in_chans", 3)
        self.decoder = Decoder(
            encoder_feature_dims(encoder),
            dim=decoder_dim,
            refine_dim=refine_dim,
            in_chans=in_chans,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x, mask=None, *, train: bool = False):
        del mask  # the segmenter predicts the mask
        return self.decoder(encoder_features(self.encoder, x, train=train), x)

    def frozen_backbone_filter(self):
        """Parameters trained in frozen-backbone mode: the decoder."""
        return nnx.All(nnx.Param, nnx.PathContains("decoder"))


def load_timm_encoder(model: Segmenter, state_dict) -> None:
    """Load a timm checkpoint (state dict or path) of the encoder's architecture into
    `model.encoder` in place; its classifier head (`head.*`) is not used."""
    if not isinstance(state_dict, Mapping):
        state_dict = timm_io.read_weights(state_dict)
    weights = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    timm_io.load_timm_state_dict(model.encoder, weights)


def create(encoder: str, *, rngs: nnx.Rngs | None = None, **overrides) -> Segmenter:
    """`Segmenter(encoder, ...)`, the trainer's entry point (`config.model.name` = encoder).

    Classifier-only keys the trainer may pass (pixel_mean/pixel_std: the early-masking fill)
    are dropped: the segmenter's encoder never masks.
    """
    for key in ("pixel_mean", "pixel_std", "early_fill"):
        overrides.pop(key, None)
    return Segmenter(encoder, rngs=rngs or nnx.Rngs(0), **overrides)


# ---------------------------------------------------------------------------------------------
# Loss and metrics: pure functions of (logits or prediction, target, valid rows).


def _row_weights(valid, batch: int):
    return jnp.ones((batch,), jnp.float32) if valid is None else valid.astype(jnp.float32)


def _weighted_mean(per_row, weights):
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def bce_loss(logits, target, valid=None):
    """Per-pixel sigmoid binary cross-entropy, averaged over pixels, then over valid rows."""
    target = target.astype(jnp.float32)
    per_pixel = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target)
    per_row = jnp.mean(per_pixel.reshape(per_pixel.shape[0], -1), axis=1)
    return _weighted_mean(per_row, _row_weights(valid, logits.shape[0]))


def dice_loss(logits, target, valid=None, smooth: float = 1.0):
    """1 - soft Dice of sigmoid(logits) per image ((2|P.T| + s) / (|P| + |T| + s)), averaged
    over valid rows. `smooth` makes an empty target predicted empty cost 0, not 0/0."""
    b = logits.shape[0]
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(b, -1)
    t = target.astype(jnp.float32).reshape(b, -1)
    dice = (2 * jnp.sum(p * t, 1) + smooth) / (jnp.sum(p, 1) + jnp.sum(t, 1) + smooth)
    return _weighted_mean(1.0 - dice, _row_weights(valid, b))


def segmentation_loss(logits, target, valid=None, *, dice_weight: float = 0.0):
    """BCE + `dice_weight` * Dice: the segmenter's training objective."""
    loss = bce_loss(logits, target, valid)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(logits, target, valid)
    return loss


def predict_mask(logits):
    """Foreground where sigmoid(logit) > 0.5, i.e. logit > 0; uint8 {0, 1}."""
    return (logits > 0).astype(jnp.uint8)


CONFUSION_KEYS = ("tp", "fp", "fn", "tn")
METRICS = ("fg_iou", "bg_iou", "miou", "pixel_accuracy")


def confusion_counts(pred, target, valid=None) -> dict[str, jax.Array]:
    """Pixel counts {tp, fp, fn, tn} (foreground = positive) over the valid rows, as int32.

    Sum them over batches (`jax.tree.map(jnp.add, ...)`) and finish with `iou_metrics`: IoU
    over a whole dataset is a ratio of totals, not a mean of per-batch ratios.
    """
    pred, target = pred.astype(bool), target.astype(bool)
    rows = _row_weights(valid, pred.shape[0]).astype(bool)
    rows = rows.reshape(-1, *([1] * (pred.ndim - 1)))
    count = lambda m: jnp.sum(m & rows, dtype=jnp.int32)
    return dict(
        tp=count(pred & target),
        fp=count(pred & ~target),
        fn=count(~pred & target),
        tn=count(~pred & ~target),
    )


def iou_metrics(counts) -> dict[str, float]:
    """{fg_iou, bg_iou, miou, pixel_accuracy} from summed confusion counts (host numbers).

    A class absent from both prediction and target (union 0) has IoU 1: nothing was missed.
    """
    tp, fp, fn, tn = (float(counts[k]) for k in CONFUSION_KEYS)
    ratio = lambda hit, union: hit / union if union > 0 else 1.0
    fg, bg = ratio(tp, tp + fp + fn), ratio(tn, tn + fp + fn)
    total = tp + fp + fn + tn
    return dict(
        fg_iou=fg,
        bg_iou=bg,
        miou=(fg + bg) / 2,
        pixel_accuracy=(tp + tn) / total if total > 0 else 1.0,
    )
