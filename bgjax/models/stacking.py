"""Running a stack of blocks: named rematerialisation policies, and one `lax.scan` over
identical blocks instead of an unrolled Python loop.

remat (`model.remat`): what each block keeps for the backward pass, the rest it recomputes.
  "none"           everything (no rematerialisation; the default)
  "full"           only the block's input: the whole block runs again in the backward pass
  "dots"           matmul outputs (`jax.checkpoint_policies.dots_saveable`)
  "dots_no_batch"  matmul outputs without batch dims (`dots_with_no_batch_dims_saveable`):
                   the linear layers' outputs, not attention's q·k and p·v
Older configs' True / False mean "full" / "none". 1×1 convolutions (ConvNeXt's conv_mlp) and
depthwise convolutions are no matmuls: the "dots" policies recompute them.

scan (`model.scan_blocks`): the blocks run as one `jax.lax.scan` over their parameters
stacked inside the call, so XLA compiles one block instead of `depth` of them. The modules stay
a list of blocks (`blocks.3.attn.qkv`): parameter names, checkpoints and timm conversion do not
change. The price is the stacking and the unstacking of the gradients, which XLA compiles too:
value_and_grad of ConvNeXt-S's 27-block stage compiles in ~3 s instead of ~6-12 s, ViT-L's 24
blocks in ~3.5 s either way (CPU; pre-stacked parameters would take ~1-2 s). Stochastic
depth keeps each block's rate and RNG stream: the keys are drawn from each block's `drop_path`
stream, in the unrolled order, before the scan, so a scanned step draws the masks the unrolled
model draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": None,  # jax.checkpoint's default: save nothing but the inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# What `model.remat` accepts: the policy names, and the booleans of older configs.
REMAT_CHOICES = (*REMAT_POLICIES, True, False)

# apply(block, x, drop) -> block output; `drop` replaces the block's own drop path (None: its own).
Apply = Callable[[nnx.Module, jax.Array, Callable | None], jax.Array]


def remat_policy(remat: str | bool) -> str:
    """The policy name of a `remat` setting (True -> "full", False -> "none")."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"remat={remat!r}: expected one of {', '.join(REMAT_POLICIES)} (or True / False)"
        )
    return remat


def with_remat(
    fn: Callable, policy: str | bool, *, static_argnums: int | tuple[int, ...] = ()
) -> Callable:
    """`fn` under `nnx.remat` with the named policy; `fn` itself for "none"."""
    policy = remat_policy(policy)
    if policy == "none":
        return fn
    return nnx.remat(fn, static_argnums=static_argnums, policy=REMAT_POLICIES[policy])


def run_blocks(
    blocks: Sequence[nnx.Module],
    x,
    apply: Apply,
    *,
    remat: str | bool = "none",
    scan: bool = False,
    train: bool = False,
    collect: bool = False,
) -> tuple[jax.Array, list[jax.Array]]:
    """`x` through `blocks` in order -> (output, [each block's output] if `collect` or unrolled).

    Unrolled, each block is one `apply(block, x, None)` (under `nnx.remat` unless "none").
    `scan` runs them as one `lax.scan` (see `scan_blocks`)."""
    if scan and len(blocks) > 1:
        return scan_blocks(blocks, x, apply, remat=remat, train=train, collect=collect)
    step = with_remat(apply, remat)
    outputs = []
    for block in blocks:
        x = step(block, x, None)
        outputs.append(x)
    return x, outputs


def scan_blocks(blocks, x, apply: Apply, *, remat="none", train=False, collect=False):
    """`run_blocks` as one `lax.scan` over the blocks' parameters, stacked here.

    The blocks must have the same parameter shapes. Their drop path (`block.drop_path`, an
    `nnx.Dropout` or None; `type(block).drop_path_calls` masks per call) is applied by the scan
    with each block's rate and keys, which are drawn from each block's stream before the scan,
    in the unrolled order."""
    graphdef, _, others = nnx.split(blocks[0], nnx.Param, ...)
    params = [nnx.state(block, nnx.Param) for block in blocks]
    for i, p in enumerate(params[1:], 1):
        if _shapes(p) != _shapes(params[0]):
            raise ValueError(
                f"scan_blocks needs blocks with the same parameters; block {i} of "
                f"{len(blocks)} ({type(blocks[i]).__name__}) differs from block 0"
            )
    # The barrier keeps XLA from fusing the stacking into the loop's reads of each step's
    # slice: that fusion costs more compile time than the scan saves (CPU, ConvNeXt-S stage 3
    # value_and_grad: 7.9 s -> 3.0 s).
    stacked = jax.lax.optimization_barrier(jax.tree.map(lambda *leaves: jnp.stack(leaves), *params))
    drops = [b.drop_path for b in blocks if b.drop_path is not None]
    dropping = train and bool(drops)
    keys = keep = None
    if dropping:
        calls = type(blocks[0]).drop_path_calls
        real = [[d.rngs() for _ in range(calls)] for d in drops]
        unused = jnp.zeros_like(jax.random.key_data(real[0][0]))
        unused = [jax.random.wrap_key_data(unused, impl=jax.random.key_impl(real[0][0]))] * calls
        drawn = iter(real)
        keys = jnp.stack(
            [jnp.stack(next(drawn) if b.drop_path is not None else unused) for b in blocks]
        )
        keep = np.asarray([1.0 - (b.drop_path.rate if b.drop_path else 0.0) for b in blocks])
        keep = jnp.asarray(keep, jnp.float32)
        broadcast_dims = drops[0].broadcast_dims

    def body(carry, step):
        params, step_keys, step_keep = step
        block = nnx.merge(graphdef, params, others)
        drop = _StepDropPath(step_keys, step_keep, broadcast_dims) if dropping else _no_drop_path
        y = apply(block, carry, drop)
        return y, y if collect else None

    policy = remat_policy(remat)
    if policy != "none":
        # prevent_cse=False: inside a scan no CSE can merge the recomputation away.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    x, ys = jax.lax.scan(body, x, (stacked, keys, keep))
    return x, [] if ys is None else list(ys)


def _shapes(state) -> list:
    return jax.tree.leaves(jax.tree.map(lambda a: (a.shape, a.dtype), state))


def _no_drop_path(y):
    return y


class _StepDropPath:
    """`nnx.Dropout(rate, broadcast_dims)` in training with the rate and keys of the scan's
    step: the same keep/drop draw and 1/(1-rate) scaling, one key per call."""

    def __init__(self, keys, keep, broadcast_dims: Sequence[int]):
        self.keys = keys
        self.keep = keep
        self.broadcast_dims = broadcast_dims
        self.calls = 0

    def __call__(self, y):
        key = self.keys[self.calls]
        self.calls += 1
        shape = [1 if d in self.broadcast_dims else n for d, n in enumerate(y.shape)]
        sharding = jax.typeof(y).sharding
        mask = jax.random.bernoulli(key, p=self.keep, shape=shape, out_sharding=sharding)
        mask = jnp.broadcast_to(mask, y.shape)
        return jax.lax.select(mask, y / self.keep.astype(y.dtype), jnp.zeros_like(y))
