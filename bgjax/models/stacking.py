"""Running a stack of blocks: named rematerialisation policies, and blocks stored stacked and
run as one `lax.scan` instead of an unrolled Python loop.

remat (`model.remat`): what each block keeps for the backward pass, the rest it recomputes.
  "none"           everything (no rematerialisation; the default)
  "full"           only the block's input: the whole block runs again in the backward pass
  "dots"           matmul outputs (`jax.checkpoint_policies.dots_saveable`)
  "dots_no_batch"  matmul outputs without batch dims (`dots_with_no_batch_dims_saveable`):
                   the linear layers' outputs, not attention's q·k and p·v
Older configs' True / False mean "full" / "none". 1×1 convolutions (ConvNeXt's conv_mlp) and
depthwise convolutions are no matmuls: the "dots" policies recompute them.

scan (`model.scan_blocks`): the blocks are one `Stack`, built with `nnx.vmap`: each parameter
holds every block's values along a leading axis (`blocks.stacked.attn.qkv.kernel`, shape
(depth, 768, 2304)), the FSDP sharding spec gets a None for that axis, and the forward pass is
one `lax.scan` over it, so XLA compiles one block instead of `depth` of them, and the optimizer
updates one array per parameter of a block instead of `depth` (as MaxText's and big_vision's
scanned layers). timm's per-block names stay on the outside: `timm_io` reads and writes
`blocks.3.attn.qkv.weight` (`per_block`), so weights convert both ways whatever the setting.
Orbax checkpoints hold the train state as it is, stacked: a run resumes with the `scan_blocks`
it was written with (`rerun` refuses a change), and evaluates and exports from its config.

Stochastic depth in a Stack: the blocks keep timm's rates (rising with depth); each step draws
one key from the Stack's own stream and splits it per block and per residual branch, so the
masks are independent across blocks and steps but not the unrolled model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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


# The attribute (and parameter-path key) of a Stack's blocks: `blocks.stacked.mlp.fc1.kernel`.
STACKED = "stacked"


class Stack(nnx.Module):
    """`len(drop_path_rates)` blocks of one architecture as one module: `make_block(rngs)` is
    built once per block under `nnx.vmap`, each parameter stacked along a new leading axis.

    The blocks are built without stochastic depth (`make_block` passes rate 0): the Stack
    applies it with each block's rate in `drop_path_rates`, `drop_path_calls` masks per block
    call (one per residual branch), one keep/drop draw per sample."""

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        drop_path_rates: Sequence[float],
        *,
        drop_path_calls: int,
        rngs: nnx.Rngs,
    ):
        depth = len(drop_path_rates)
        if depth < 1:
            raise ValueError("a Stack needs at least one block")

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def build(rngs):
            return make_block(rngs)

        self.stacked = build(rngs)  # the attribute name is STACKED
        self.depth = depth
        self.drop_path_rates = tuple(float(r) for r in drop_path_rates)
        self.drop_path_calls = drop_path_calls
        # nnx.Dropout's stream: "dropout", else "default".
        self.drop_rngs = rngs["dropout"].fork() if any(self.drop_path_rates) else None

    def __len__(self) -> int:
        return self.depth

    def block(self, index: int) -> nnx.Module:
        """Block `index` as a module of its own (a copy of its slice of the parameters)."""
        graphdef, state = nnx.split(self.stacked)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

    def unstacked(self) -> list[nnx.Module]:
        """The blocks as separate modules (copies), for code that needs to reach into one."""
        return [self.block(i) for i in range(self.depth)]


def build_blocks(
    make_block: Callable[..., nnx.Module],
    drop_path_rates: Sequence[float],
    *,
    scan: bool,
    drop_path_calls: int,
    rngs: nnx.Rngs,
) -> nnx.List | Stack:
    """One block per rate, `make_block(drop_path=rate, rngs=rngs)`: a list, or (`scan`) one
    `Stack` that applies the rates itself."""
    if scan:
        return Stack(
            lambda rngs: make_block(drop_path=0.0, rngs=rngs),
            drop_path_rates,
            drop_path_calls=drop_path_calls,
            rngs=rngs,
        )
    return nnx.List([make_block(drop_path=rate, rngs=rngs) for rate in drop_path_rates])


def run_blocks(
    blocks: Sequence[nnx.Module] | Stack,
    x,
    apply: Apply,
    *,
    remat: str | bool = "none",
    train: bool = False,
    collect: bool = False,
) -> tuple[jax.Array, list[jax.Array]]:
    """`x` through `blocks` in order -> (output, [each block's output] if `collect` or unrolled).

    A list runs unrolled, each block one `apply(block, x, None)` (under `nnx.remat` unless
    "none"); a `Stack` runs as one `lax.scan` over its stacked parameters."""
    if isinstance(blocks, Stack):
        return _scan(blocks, x, apply, remat=remat, train=train, collect=collect)
    step = with_remat(apply, remat)
    outputs = []
    for block in blocks:
        x = step(block, x, None)
        outputs.append(x)
    return x, outputs


def _scan(stack: Stack, x, apply: Apply, *, remat, train: bool, collect: bool):
    graphdef, state = nnx.split(stack.stacked)
    dropping = train and stack.drop_rngs is not None
    keys = keep = None
    if dropping:
        keys = jax.random.split(stack.drop_rngs(), (stack.depth, stack.drop_path_calls))
        keep = jnp.asarray([1.0 - r for r in stack.drop_path_rates], jnp.float32)

    def body(carry, step):
        state, step_keys, step_keep = step
        block = nnx.merge(graphdef, state)
        drop = _StepDropPath(step_keys, step_keep) if dropping else _no_drop_path
        y = apply(block, carry, drop)
        return y, y if collect else None

    policy = remat_policy(remat)
    if policy != "none":
        # prevent_cse=False: inside a scan no CSE can merge the recomputation away.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    x, ys = jax.lax.scan(body, x, (state, keys, keep))
    return x, [] if ys is None else list(ys)


def per_block(path: tuple, value) -> list[tuple[tuple, Any]]:
    """[(path, value)] of one parameter, a stacked one split into its blocks' (path with the
    block index for `STACKED`, slice): the per-block names timm and the unrolled model use."""
    keys = tuple(str(k) for k in path)
    if STACKED not in keys:
        return [(path, value)]
    at = keys.index(STACKED)
    return [(keys[:at] + (str(i),) + keys[at + 1 :], value[i]) for i in range(value.shape[0])]


def stacked_axes(path: Sequence[Any]) -> int:
    """How many leading axes of the parameter at `path` (plain keys) index blocks: 0 or 1."""
    return int(STACKED in tuple(str(k) for k in path))


def _no_drop_path(y):
    return y


class _StepDropPath:
    """Stochastic depth with the rate and keys of the scan's step: one keep/drop draw per
    sample (every other dim broadcast), survivors scaled by 1/keep, one key per call."""

    def __init__(self, keys, keep):
        self.keys = keys
        self.keep = keep
        self.calls = 0

    def __call__(self, y):
        key = self.keys[self.calls]
        self.calls += 1
        shape = (y.shape[0],) + (1,) * (y.ndim - 1)
        sharding = jax.typeof(y).sharding
        mask = jax.random.bernoulli(key, p=self.keep, shape=shape, out_sharding=sharding)
        mask = jnp.broadcast_to(mask, y.shape)
        return jax.lax.select(mask, y / self.keep.astype(y.dtype), jnp.zeros_like(y))
