"""The optimizer from `config.optimizer`: clip -> AdamW (warm-up + cosine), per-group settings.

    config.optimizer = dict(lr=1e-3, wd=0.05, warmup_steps=20, min_lr_ratio=0.0, b1=0.9,
                            b2=0.999, head_lr_mult=1.0, head_keys=("head",), clip_norm=1.0,
                            grad_accum=1, ema_decay=0.0, wd_params="kernels")

Weight decay (`wd_params`): "kernels" skips norms, biases, layer-scale gammas and embeddings
(timm / big_vision practice); "all" decays every trained parameter, as `torch.optim.AdamW` over
plain parameter groups does in the masking paper's code. The head can learn faster
(`head_lr_mult`, the paper's x100 / x1000); the group that does is the parameters under
`head_keys` plus the prefixes the model names (`head_prefixes`: what it retrains after a late
mask). Gradient accumulation and the weight EMA live in the train step, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from bgjax.models import stacking
from bgjax.parallel import _path_key

# Parameters excluded from weight decay by name, besides every rank < 2 tensor (biases, norm
# scales): ViT's position / class / register embeddings and ConvNeXt's / DINOv2's layer-scale.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "gamma", "bias", "scale")
WD_PARAMS = ("kernels", "all")


def schedule(cfg: Any, total_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Linear warm-up from 0 to lr*scale over `warmup_steps`, then cosine to lr*min_lr_ratio."""
    peak = float(cfg.lr) * scale
    warmup = int(cfg.get("warmup_steps", 0))
    if total_steps <= warmup:
        raise ValueError(f"total_steps={total_steps} must exceed optimizer.warmup_steps={warmup}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=peak * float(cfg.get("min_lr_ratio", 0.0)),
    )


def decays(path: Sequence[Any], leaf: Any) -> bool:
    """Whether weight decay applies to the parameter at `path` (kernels and weight matrices)."""
    keys = _path_key(path)
    rank = leaf.ndim - stacking.stacked_axes(keys)  # a stacked block's bias is still a bias
    return rank >= 2 and not any(k in NO_DECAY_NAMES for k in keys)


def is_head(path: Sequence[Any], prefixes: Sequence[Sequence[str]]) -> bool:
    """Whether the parameter at `path` starts with one of the key `prefixes`."""
    keys = tuple(_path_key(path))
    return any(keys[: len(p)] == tuple(p) for p in prefixes)


def make(
    cfg: Any, total_steps: int, head_prefixes: Sequence[Sequence[str]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, backbone lr schedule). `tx` works on any params pytree (an nnx.State).
    `head_prefixes`: key paths that learn at `head_lr_mult`, besides `cfg.head_keys`."""
    head_mult = float(cfg.get("head_lr_mult", 1.0))
    prefixes = [(k,) for k in cfg.get("head_keys", ("head",))] + [tuple(p) for p in head_prefixes]
    base = schedule(cfg, total_steps)
    wd_params = cfg.get("wd_params", "kernels")
    if wd_params not in WD_PARAMS:
        raise ValueError(f"optimizer.wd_params={wd_params!r}; expected one of {WD_PARAMS}")

    def adamw(lr: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(
            lr,
            b1=float(cfg.get("b1", 0.9)),
            b2=float(cfg.get("b2", 0.999)),
            weight_decay=float(cfg.get("wd", 0.0)),
            mask=None
            if wd_params == "all"
            else lambda params: jax.tree_util.tree_map_with_path(decays, params),
        )

    if head_mult == 1.0:
        body = adamw(base)
    else:
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if is_head(path, prefixes) else "backbone", params
        )
        body = optax.multi_transform(
            {"backbone": adamw(base), "head": adamw(schedule(cfg, total_steps, head_mult))},
            labels,
        )
    clip = float(cfg.get("clip_norm", 0.0) or 0.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), body) if clip > 0 else body
    return tx, base
