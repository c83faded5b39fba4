"""Vision Transformer (Dosovitskiy et al. 2021) and DINOv2 in Flax NNX, numerically equal to timm.

Attribute names are timm's module names (`cls_token`, `reg_token`, `pos_embed`,
`patch_embed.proj`, `blocks.3.attn.qkv`, `blocks.3.ls1.gamma`, `norm`, `head`; scanned blocks
`blocks.stacked.attn.qkv` with a leading block axis), so `timm_io` converts weights
mechanically. Images are NHWC. On top of timm's model: background masking (Aniraj et al., ICCVW
2023) and our attention masking, position-embedding resampling to any input size
(`pos_embed`), named rematerialisation policies and blocks stored stacked and scanned
(`stacking`), a compute dtype separate from the fp32 parameters, FSDP partitioning metadata on
kernels, and the lowering of each op chosen once by `kernels` ("auto" | "xla" | "cpu", see
`cpu_kernels`).

Masking strategies (`masking=`):
  "early"  background pixels become `early_fill` before the patch embedding.
  "late"   patch tokens are multiplied by the token-grid mask after block `late_block`
           (-1: after the last block and the final norm, as the paper's code does; -2: after
           the second-last block, then an extra LayerNorm `late_norm`, then the last block).
  "attn"   (ours) background pixels are filled as in "early", and tokens whose patch holds no
           foreground pixel are excluded as attention *keys* in every block, so no token ever
           reads them; pooling covers foreground tokens only. The logits are then exactly
           invariant to background pixels.
Prefix tokens (CLS and registers) are never masked and always attendable.

Token-grid rule. "late" uses `masking.resize_mask_nearest` (torch `nearest-exact`, the paper's
code), which for a patch grid reads each patch's *centre* pixel — close to a majority vote for
compact masks, and the same rule as ConvNeXt's late masking. "attn" needs a rule that
never drops foreground, so there a token is foreground if *any* of its pixels is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bgjax.data import IMAGENET_MEAN, IMAGENET_STD
from bgjax.models import cpu_kernels, layers, stacking
from bgjax.models import masking as masking_lib
from bgjax.models.pos_embed import resample_pos_embed, sincos_2d_pos_embed
from bgjax.models.vit_blocks import Block, PatchEmbed

MASKING_STRATEGIES = (*masking_lib.MASKING_STRATEGIES, "attn")
HEAD_POOLS = ("cls", "gap", "cls+gap")
# Default heads: timm's CLS for "none"/"early" (timm classifiers load as they are), CLS ‖ patch
# mean for "late", the foreground mean for "attn" (background-invariant by construction). The
# masking paper uses "cls+gap" for every strategy; its configs (cub.py, ...) set it explicitly.
# "trunc_normal" is timm's N(0, 0.02); "sincos2d" starts from the fixed 2-D sine-cosine table
# (MoCo v3, MAE, big_vision) and stays trainable: small ViTs trained from scratch learn shape
# cues about twice as fast with it (bgjax demo), and the parameter tree is timm's either way.
POS_EMBED_INITS = ("trunc_normal", "sincos2d")
DEFAULT_HEAD_POOL = {"none": "cls", "early": "cls", "late": "cls+gap", "attn": "gap"}

# cuDNN's fused attention needs an even sequence to train with a mask (ViT-B/16 has 197
# tokens); a multiple of 8 also keeps its tiles whole.
CUDNN_SEQ_MULTIPLE = 8


def _pad_tokens(tokens, key_mask, multiple: int):
    """(B, N, D) tokens and (B, N) key mask padded to N rounded up to `multiple`; padding
    tokens are zeros and never attendable, so real tokens' outputs do not change."""
    pad = -tokens.shape[1] % multiple
    tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))
    return tokens, jnp.pad(key_mask, ((0, 0), (0, pad)), constant_values=False)


# ---------------------------------------------------------------------------------------------
# The model.


class VisionTransformer(nnx.Module):
    """timm's `VisionTransformer` (class token, learned position embedding, pre-norm blocks,
    final `norm`, linear `head`), with optional registers, LayerScale and background masking.

    `model(x, mask=None, *, train=False)`: x normalised NHWC float (B, H, W, in_chans); mask
    (B, H, W) foreground in input pixels, required iff `masking != "none"`. Inputs of another
    size than `img_size` work: the position embedding is resampled on the fly (bicubic,
    `pos_embed_antialias`), like timm's `dynamic_img_size=True`.

    head_pool: "cls" (token 0, timm), "gap" (mean of patch tokens after `norm`, = timm's
    global_pool="avg" with fc_norm=False) or "cls+gap" (concatenated; head input 2·D). With
    late masking, "gap" averages over all patch positions, zeros included (`late_pool="mean"`,
    the paper) or over foreground positions (`"masked_mean"`); with "attn" always over
    foreground. num_classes=0 gives no head: the pooled features are returned.

    kernels: each op's lowering ("auto": the CPU ones on the CPU backend, see `cpu_kernels`),
    resolved here, once; `attn_impl` ("xla" | "cudnn") makes attention
    `jax.nn.dot_product_attention` with that implementation ("auto": cuDNN's fused kernel on
    NVIDIA GPUs in bf16, else the kernel set's). cuDNN trains with a key mask (the "attn"
    strategy) only on an even sequence: the tokens are then padded to a multiple of
    `CUDNN_SEQ_MULTIPLE` with padding tokens no token attends to, dropped after the blocks.
    dtype: the compute dtype ("auto": bf16 on accelerators, fp32 on the CPU).
    remat: a `stacking.REMAT_POLICIES` name (or True / False); scan_blocks: the blocks are
    stored as one `stacking.Stack` and run as one `lax.scan` (timm's names in `timm_io`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        rngs: nnx.Rngs,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        gated_mlp: bool = False,
        init_values: float | None = None,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        drop_path_rate: float = 0.0,
        dtype=jnp.float32,
        remat: str | bool = "none",
        scan_blocks: bool = False,
        kernels: str = "auto",
        attn_impl: str | None = "auto",
        pos_embed_antialias: bool = False,
        pos_embed_init: str = "trunc_normal",
        masking: str = "none",
        early_fill: str = "black",
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        late_block: int = -1,
        late_pool: str = "mean",
        head_pool: str | None = None,
    ):
        masking_lib.check_strategy(masking, MASKING_STRATEGIES)
        head_pool = head_pool or DEFAULT_HEAD_POOL[masking]
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"unknown head_pool {head_pool!r}; expected one of {HEAD_POOLS}")
        if not -depth <= late_block <= -1:
            raise ValueError(f"late_block must be in [-{depth}, -1] (depth {depth}): {late_block}")
        if scan_blocks and masking == "late" and late_block < -1:
            raise ValueError(
                f"scan_blocks stores the blocks as one stacked array, but late_block={late_block} "
                "masks between blocks and retrains the blocks after the mask on their own: "
                "set scan_blocks=False (model.scan_blocks) for this late-masking variant"
            )
        masking_lib.check_late_options(late_pool)
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(
                f"unknown pos_embed_init {pos_embed_init!r}; expected one of {POS_EMBED_INITS}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        if min(grid_size) < 1:
            raise ValueError(f"img_size {img_size} is smaller than patch_size {patch_size}")
        fill = masking_lib.early_fill_value(early_fill, pixel_mean, pixel_std, in_chans)
        dtype = cpu_kernels.resolve_dtype(dtype)
        self.attn_impl = cpu_kernels.resolve_attention(attn_impl, dtype)
        ops = cpu_kernels.ops(kernels, attn_impl=self.attn_impl)

        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.img_size = img_size
        self.grid_size = grid_size
        self.num_prefix_tokens = 1 + reg_tokens
        self.no_embed_class = no_embed_class
        self.num_pos_prefix_tokens = 0 if no_embed_class else self.num_prefix_tokens
        self.dtype = dtype
        self.remat = stacking.remat_policy(remat)
        self.pos_embed_antialias = pos_embed_antialias
        self.masking = masking
        self.early_fill_value = tuple(float(v) for v in fill)  # static: not a parameter
        self.late_block = late_block
        self.late_pool = late_pool
        self.head_pool = head_pool
        self.kernels = ops.name

        key = rngs.params
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, embed_dim, ops=ops, dtype=dtype, rngs=rngs
        )
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(key(), (1, 1, embed_dim)))
        self.reg_token = (
            nnx.Param(1e-6 * jax.random.normal(key(), (1, reg_tokens, embed_dim)))
            if reg_tokens
            else None
        )
        embed_len = grid_size[0] * grid_size[1] + self.num_pos_prefix_tokens
        trunc = nnx.initializers.truncated_normal(stddev=0.02)
        if pos_embed_init == "sincos2d":
            grid = sincos_2d_pos_embed(grid_size, embed_dim)
            prefix = np.zeros((self.num_pos_prefix_tokens, embed_dim), np.float32)
            self.pos_embed = nnx.Param(jnp.asarray(np.concatenate([prefix, grid]))[None])
        else:
            self.pos_embed = nnx.Param(trunc(key(), (1, embed_len, embed_dim)))
        rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        block = functools.partial(
            Block,
            embed_dim,
            num_heads,
            int(embed_dim * mlp_ratio),
            gated_mlp=gated_mlp,
            init_values=init_values,
            ops=ops,
            dtype=dtype,
        )
        self.blocks = stacking.build_blocks(
            block, rates, scan=scan_blocks, drop_path_calls=Block.drop_path_calls, rngs=rngs
        )
        self.late_norm = (
            layers.layer_norm(embed_dim, dtype, rngs, ops)
            if masking == "late" and late_block < -1
            else None
        )
        self.norm = layers.layer_norm(embed_dim, dtype, rngs, ops)
        head_in = 2 * embed_dim if head_pool == "cls+gap" else embed_dim
        self.head = (
            nnx.Linear(head_in, num_classes, kernel_init=trunc, rngs=rngs) if num_classes else None
        )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _embed(self, x):
        """Patch tokens + position embedding, with prefix tokens: (B, prefix + h*w, D)."""
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        pos = self.pos_embed[...]
        if (h, w) != self.grid_size:
            pos = resample_pos_embed(
                pos, (h, w), self.grid_size, self.num_pos_prefix_tokens,
                antialias=self.pos_embed_antialias,
            )  # fmt: skip
        pos = pos.astype(x.dtype)
        x = x.reshape(b, h * w, d)
        prefix = [jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))]
        if self.reg_token is not None:
            reg = self.reg_token[...].astype(x.dtype)
            prefix.append(jnp.broadcast_to(reg, (b, *reg.shape[1:])))
        if self.no_embed_class:  # DINOv2 registers, DeiT-3: prefix tokens carry no position
            return jnp.concatenate([*prefix, x + pos], axis=1)
        return jnp.concatenate([*prefix, x], axis=1) + pos

    def _with_prefix(self, token_mask, dtype):
        """(B, h, w) patch mask -> (B, prefix + h*w) with the prefix tokens set to 1."""
        b = token_mask.shape[0]
        ones = jnp.ones((b, self.num_prefix_tokens), dtype)
        return jnp.concatenate([ones, token_mask.reshape(b, -1).astype(dtype)], axis=1)

    def _forward(self, x, mask, train: bool, collect: bool = False):
        """-> (tokens after `norm` (B, N, D), pooling mask (B, h, w) or None, block outputs
        (scanned blocks: only if `collect`))."""
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"expected NHWC images with {self.in_chans} channels, got {x.shape}")
        masking_lib.check_mask(x, mask, self.masking)
        if self.masking in ("early", "attn"):
            x = masking_lib.early_mask(x, mask, jnp.asarray(self.early_fill_value, x.dtype))
        grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"images {x.shape} are smaller than one {self.patch_size}px patch")
        tokens = layers.constrain_batch(self._embed(x.astype(self.dtype)))

        key_mask = token_scale = pool_mask = None
        if self.masking == "attn":
            pool_mask = masking_lib.patch_grid_mask(mask, self.patch_size, grid, rule="any")
            key_mask = self._with_prefix(pool_mask, jnp.bool_)
        elif self.masking == "late":
            grid_mask = masking_lib.patch_grid_mask(mask, self.patch_size, grid, rule="centre")
            token_scale = self._with_prefix(grid_mask, tokens.dtype)[..., None]
            pool_mask = grid_mask if self.late_pool == "masked_mean" else None
        # late_block=-k < -1 masks after block depth-k (behind `late_norm`); -1 after `norm`.
        mask_after = self.depth + self.late_block if self.late_norm is not None else None

        length = tokens.shape[1]
        if key_mask is not None and self.attn_impl == "cudnn":
            tokens, key_mask = _pad_tokens(tokens, key_mask, CUDNN_SEQ_MULTIPLE)

        def apply(block, x, drop):
            return layers.constrain_batch(block(x, key_mask, train=train, drop=drop))

        splits = [0, self.depth] if mask_after is None else [0, mask_after + 1, self.depth]
        intermediates = []
        for start, stop in zip(splits[:-1], splits[1:]):
            # A Stack is never split: the constructor refuses scanning with a mask between blocks.
            blocks = (
                self.blocks if isinstance(self.blocks, stacking.Stack) else self.blocks[start:stop]
            )
            tokens, outputs = stacking.run_blocks(
                blocks, tokens, apply, remat=self.remat, train=train, collect=collect
            )
            intermediates += [out[:, :length] for out in outputs]
            if stop - 1 == mask_after:
                tokens = self.late_norm(tokens) * token_scale
        tokens = self.norm(tokens[:, :length])
        if token_scale is not None and self.late_norm is None:
            tokens = tokens * token_scale  # the paper masks the final normalised tokens
        return tokens, pool_mask, intermediates

    def forward_intermediates(self, x, mask=None, *, train: bool = False):
        """(tokens after the final norm, [output of each block]), all (B, prefix + h*w, D).

        Block outputs are taken before any late masking that follows them."""
        tokens, _, intermediates = self._forward(x, mask, train, collect=True)
        return tokens, intermediates

    def forward_features(self, x, mask=None, *, train: bool = False):
        """All tokens (prefix first) after the final norm, late masking applied."""
        return self._forward(x, mask, train)[0]

    def pool(self, tokens, pool_mask=None):
        """(B, N, D) tokens -> (B, D or 2D) float32 head input; `pool_mask` (B, h, w) restricts
        the patch mean to foreground tokens."""
        tokens = tokens.astype(jnp.float32)
        cls = tokens[:, 0]
        if self.head_pool == "cls":
            return cls
        patches = tokens[:, self.num_prefix_tokens :]
        if pool_mask is None:
            gap = jnp.mean(patches, axis=1)
        else:
            b, h, w = pool_mask.shape
            gap = masking_lib.masked_mean_pool(patches.reshape(b, h, w, -1), pool_mask)
        return gap if self.head_pool == "gap" else jnp.concatenate([cls, gap], axis=-1)

    def __call__(self, x, mask=None, *, train: bool = False):
        tokens, pool_mask, _ = self._forward(x, mask, train)
        pooled = self.pool(tokens, pool_mask)
        # The head runs in float32 whatever the compute dtype: it is tiny and feeds the loss.
        return pooled if self.head is None else self.head(pooled)

    def head_prefixes(self) -> tuple[tuple[str, ...], ...]:
        """What the masking paper's code trains afresh: the head; masked before the last block
        (late_block < -1) also the blocks after the mask, `norm` and `late_norm`."""
        prefixes = [("head",)]
        if self.late_norm is not None:
            after = range(self.depth + self.late_block + 1, self.depth)
            prefixes += [("blocks", str(i)) for i in after] + [("norm",), ("late_norm",)]
        return tuple(prefixes)

    def frozen_backbone_filter(self):
        """Parameters trained in frozen-backbone mode: those under `head_prefixes()`."""
        return nnx.All(nnx.Param, functools.partial(layers.path_has_prefix, self.head_prefixes()))


# ---------------------------------------------------------------------------------------------
# Named architectures (timm's entry points of the same names).

_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
# timm: mlp_ratio 2.66667 * 2 with SwiGLUPacked -> fc1 8192 wide, gated down to 4096.
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, gated_mlp=True)
_DINOV2_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": _GIANT,
}

_ARCHS = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    **{f"vit_{s}_patch14_dinov2": {**_DINOV2, **a} for s, a in _DINOV2_SIZES.items()},
    **{f"vit_{s}_patch14_reg4_dinov2": {**_DINOV2, **_REG4, **a} for s, a in _DINOV2_SIZES.items()},
}


# Keyword arguments given at the call win, like timm's `create_model(name, depth=...)`.
MODELS = {name: functools.partial(VisionTransformer, **arch) for name, arch in _ARCHS.items()}


def vit_custom(*, num_classes: int = 10, rngs: nnx.Rngs | None = None, **overrides):
    """A tiny ViT for tests and CPU runs (depth 2, width 32, 2 heads, 32 px, patch 8)."""
    arch = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return VisionTransformer(num_classes=num_classes, rngs=rngs or nnx.Rngs(0), **arch | overrides)
