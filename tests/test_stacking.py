"""Remat policies and stacked, scanned blocks (`bgjax.models.stacking`): the same numbers as the
unrolled, remat-free model, timm's names outside, and the compiled programs they promise (a
loop; recomputation).

Models are built abstractly and filled with seeded values (eager initialisation compiles every
initializer op); tiny widths and 32 px keep each compile around a second.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import config_utils, rerun, train
from bgjax.models import convnext, cpu_kernels, stacking, timm_io, vit

X = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
VIT = dict(depth=3, reg_tokens=1, no_embed_class=True, init_values=0.5)


def _filled(make) -> nnx.Module:
    """`make()` built abstractly, then given seeded parameters and fresh RNG streams: models
    of the same architecture get the same values whatever their other settings."""
    model = nnx.eval_shape(make)
    state = nnx.state(model)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape = var.get_value().shape
        if path[-1] == "key":
            var.set_value(jax.random.key(i))
        elif path[-1] == "count":
            var.set_value(jnp.zeros(shape, jnp.uint32))
        else:
            rng = np.random.default_rng(i)
            scale = 1 / np.sqrt(shape[-2]) if len(shape) >= 2 else 0.2
            value = rng.standard_normal(shape) * scale + (len(shape) == 1 and path[-1] != "bias")
            var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    return model


def make_vit(**overrides):
    return _filled(lambda: vit.vit_custom(num_classes=5, **{**VIT, **overrides}))


def make_convnext(**overrides):
    arch = dict(depths=(1, 3, 1, 1), dims=(8, 16, 16, 32))
    return _filled(lambda: convnext.ConvNeXt(num_classes=5, rngs=nnx.Rngs(0), **arch, **overrides))


def make_stage(**overrides):
    """A ConvNeXt stage of 3 blocks with drop-path rates 0 (no drop-path module), .2 and .4."""
    rates = overrides.pop("drop_path_rates", [0.0, 0.2, 0.4])
    return _filled(
        lambda: convnext.Stage(8, 8, rates, downsample=False, conv_mlp=False, ls_init_value=0.5,
                               ops=cpu_kernels.ops(), dtype=jnp.float32, rngs=nnx.Rngs(0),
                               **overrides)
    )  # fmt: skip


@nnx.jit(static_argnames="train")
def loss_and_grads(model, x, train: bool):
    return nnx.value_and_grad(lambda m: jnp.sum(m(x, train=train) ** 2))(model)


def _assert_close(a, b, tol: float = 0.0):
    """Equal up to float32 reassociation: `tol` times each array's largest magnitude."""

    def check(u, v):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol * float(np.abs(v).max()))

    jax.tree.map(check, a, b)


def _rng_counts(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.RngCount))


# ------------------------------------------------------------------------------------------
# Stacked and scanned = unrolled: values, gradients, names; stochastic depth per block.


def stacked_like(model, make, **overrides):
    """`make(scan_blocks=True, **overrides)` holding `model`'s weights, moved through timm's
    per-block names (the way weights enter a scanned model)."""
    stacked = make(scan_blocks=True, **overrides)
    timm_io.load_timm_state_dict(stacked, timm_io.to_timm_state_dict(model))
    return stacked


def per_block(state) -> dict[tuple, jax.Array]:
    """{per-block path: value} of an nnx.State, stacked variables split into their blocks."""
    return {
        tuple(map(str, block_path)): value
        for path, var in nnx.to_flat_state(state)
        for block_path, value in stacking.per_block(path, var.get_value())
    }


@pytest.mark.parametrize("make", [make_vit, make_convnext], ids=["vit", "convnext"])
def test_stacked_blocks_match_unrolled(make):
    unrolled = make()
    stacked = stacked_like(unrolled, make)
    # Stored stacked: one array per parameter of a block, with a leading block axis of 3.
    shapes = {
        tuple(map(str, p)): v.get_value().shape
        for p, v in nnx.to_flat_state(nnx.state(stacked, nnx.Param))
    }
    stack = ("blocks",) if make is make_vit else ("stages", "1", "blocks")
    kernel = (
        *stack,
        "stacked",
        *(("attn", "qkv") if make is make_vit else ("mlp", "fc1")),
        "kernel",
    )
    assert shapes[kernel][0] == 3
    assert not any(p[: len(stack) + 1] == (*stack, "0") for p in shapes)
    loss, grads = loss_and_grads(unrolled, X, True)  # train mode, no drop path: deterministic
    loss_s, grads_s = loss_and_grads(stacked, X, True)
    _assert_close(loss_s, loss, 1e-6)
    g, g_s = per_block(grads), per_block(grads_s)
    assert g_s.keys() == g.keys()
    _assert_close([g_s[k] for k in g], list(g.values()), 1e-5)


def test_stacked_vit_intermediates_and_late_masking():
    kw = dict(masking="late", late_block=-1)
    unrolled = make_vit(**kw)
    stacked = stacked_like(unrolled, make_vit, **kw)
    mask = jnp.zeros((2, 32, 32)).at[:, 8:24, 4:20].set(1.0)
    run = nnx.jit(lambda m: (m(X, mask), *m.forward_intermediates(X, mask)))
    (logits, tokens, blocks), (logits_s, tokens_s, blocks_s) = run(unrolled), run(stacked)
    assert len(blocks_s) == len(blocks) == 3
    _assert_close((logits_s, tokens_s, blocks_s), (logits, tokens, blocks), 1e-5)
    # A mask between blocks retrains the blocks after it apart from the rest: not one stack.
    with pytest.raises(ValueError, match="late_block=-2 masks between blocks.*scan_blocks=False"):
        make_vit(masking="late", late_block=-2, scan_blocks=True)


def test_stacked_drop_path_draws_per_block_and_step():
    # Rates 0, .2, .4 over 3 blocks. The reference runs the stack's blocks one by one with the
    # keys the scan splits from the stack's stream: same masks, same loss and gradients.
    model = make_vit(scan_blocks=True, drop_path_rate=0.4)
    assert model.blocks.drop_path_rates == pytest.approx((0.0, 0.2, 0.4))
    key = jax.random.fold_in(model.blocks.drop_rngs.key.get_value(), 0)  # the stream's next key
    keys = jax.random.split(key, (3, vit.Block.drop_path_calls))

    def reference(m):
        blocks = m.blocks.unstacked()
        tokens = m._embed(X)
        for i, block in enumerate(blocks):
            keep = jnp.float32(1.0 - m.blocks.drop_path_rates[i])
            tokens = block(tokens, train=True, drop=stacking._StepDropPath(keys[i], keep))
        return jnp.sum(m.head(m.pool(m.norm(tokens))) ** 2)

    expected = nnx.jit(lambda m: nnx.value_and_grad(reference)(m))(model)
    loss, grads = loss_and_grads(model, X, True)
    _assert_close((loss, per_block(grads)), (expected[0], per_block(expected[1])), 1e-5)
    eval_loss = loss_and_grads(model, X, False)[0]
    assert float(loss) != pytest.approx(float(eval_loss))  # blocks 1 and 2 did drop samples
    # The stream advanced: the next step draws other masks.
    assert int(model.blocks.drop_rngs.count.get_value()) == 1
    assert float(loss_and_grads(model, X, True)[0]) != pytest.approx(float(loss))


def test_step_drop_path_keeps_samples_at_the_rate():
    y = jnp.ones((4000, 3, 2))
    out = stacking._StepDropPath(jax.random.split(jax.random.key(0), 1), jnp.float32(0.75))(y)
    kept = np.asarray(out[:, 0, 0]) > 0
    assert abs(kept.mean() - 0.75) < 0.03  # one draw per sample, the rest broadcast
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.75, rtol=1e-6)
    assert (np.asarray(out)[~kept] == 0).all()


@pytest.mark.parametrize("make", [make_vit, make_convnext], ids=["vit", "convnext"])
def test_stacked_blocks_keep_timm_names(make):
    unrolled, stacked = make(), make(scan_blocks=True)
    exported = timm_io.to_timm_state_dict(stacked)
    assert exported.keys() == timm_io.to_timm_state_dict(unrolled).keys()
    block = "blocks.2.attn.qkv.weight" if make is make_vit else "stages.1.blocks.2.mlp.fc1.weight"
    assert block in exported
    reloaded = make(scan_blocks=True)
    timm_io.load_timm_state_dict(reloaded, exported)  # timm names in, into a stacked model
    _assert_close(nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)),
                  nnx.to_pure_dict(nnx.state(stacked, nnx.Param)))  # fmt: skip
    # A missing or mis-shaped block is named by its timm key.
    broken = dict(exported)
    del broken[block]
    bias = block.replace(".weight", ".bias")
    broken[bias] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=rf"missing keys \(1\): {block}.*mis-shaped.*{bias}"):
        timm_io.load_timm_state_dict(make(scan_blocks=True), broken)


def test_stacked_parameters_shard_and_decay_per_block():
    from jax.sharding import PartitionSpec as P

    from bgjax import optim, parallel

    model = nnx.eval_shape(lambda: vit.vit_custom(depth=3, embed_dim=512, scan_blocks=True))
    params = nnx.state(model, nnx.Param)
    mesh = jax.make_mesh((1, 4), ("data", "fsdp"), devices=jax.devices()[:4])
    shardings = parallel.state_shardings(params, mesh, min_size=2**16)
    spec = {tuple(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}
    value = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    qkv, proj, bias, norm = (
        ("blocks", "stacked", *name)
        for name in (("attn", "qkv", "kernel"), ("attn", "proj", "kernel"),
                     ("attn", "qkv", "bias"), ("norm1", "scale"))
    )  # fmt: skip
    # The block axis is never sharded (the scan slices it); each block's kernel is, as unrolled.
    assert value[qkv].shape == (3, 512, 1536)
    assert spec[qkv] == P(None, None, "fsdp") and spec[proj] == P(None, "fsdp")
    assert spec[bias] == P()  # small: replicated
    # A stacked bias or norm scale is still no weight matrix: no weight decay.
    assert value[bias].ndim == 2
    assert optim.decays(qkv, value[qkv])
    assert not optim.decays(bias, value[bias]) and not optim.decays(norm, value[norm])


def test_saliency_reaches_into_stacked_blocks():
    from bgjax.analysis import saliency

    unrolled = make_vit()
    stacked = stacked_like(unrolled, make_vit)
    labels = jnp.array([1, 3])
    cams = [saliency.grad_cam(*nnx.split(m), X, None, labels, saliency.apply_model)
            for m in (unrolled, stacked)]  # fmt: skip
    _assert_close(cams[1], cams[0], 1e-5)
    assert isinstance(stacked.blocks, stacking.Stack)  # the model itself stays stacked


# ------------------------------------------------------------------------------------------
# Remat policies.


@functools.cache
def grad_program(remat: str = "none", scan_blocks: bool = False):
    """(loss, grads, lowered StableHLO, compiled HLO) of d(sum of squared logits)/d(params) of
    a 2-block ViT; each setting compiled once for the tests below."""
    model = make_vit(depth=2, remat=remat)
    if scan_blocks:
        model = stacked_like(model, functools.partial(make_vit, depth=2, remat=remat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(X) ** 2)
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
    compiled = lowered.compile()
    value, grads = compiled(params)
    return value, per_block(grads), lowered.as_text(), compiled.as_text()


def _dots(program: str) -> int:
    return program.count("stablehlo.dot_general")


def test_remat_policies_same_gradients_and_recompute():
    reference = grad_program()
    dots = {}
    for policy in stacking.REMAT_POLICIES:
        loss, grads, lowered, _ = grad_program(policy)
        _assert_close((loss, grads), reference[:2], 1e-5)
        dots[policy] = _dots(lowered)
    # The backward pass recomputes what the policy does not keep: "full" the blocks' matmuls,
    # "dots_no_batch" only attention's two batched ones, "dots" none.
    assert dots["dots"] == dots["none"] < dots["dots_no_batch"] < dots["full"], dots


def test_scan_compiles_to_a_loop():
    loss, grads, _, unrolled = grad_program()
    loss_s, grads_s, lowered, scanned = grad_program(scan_blocks=True)
    _assert_close((loss_s, grads_s), (loss, grads), 1e-5)
    assert " while(" not in unrolled and " while(" in scanned
    assert _dots(lowered) < _dots(grad_program()[2])  # one block's matmuls, not depth of them
    # Remat under the scan: the loop body recomputes the block's forward matmuls.
    assert _dots(grad_program("full", scan_blocks=True)[2]) > _dots(lowered)


def test_remat_setting_names():
    assert [stacking.remat_policy(v) for v in (True, False, "dots")] == ["full", "none", "dots"]
    with pytest.raises(ValueError, match="remat='all': expected one of none, full, dots, dots_no"):
        make_vit(remat="all")
    with pytest.raises(ValueError, match="config.model.remat='all': expected one of none, full"):
        train._check_choice("model.remat", "all", train.CHOICES["model.remat"])
    for value in (True, False, "dots_no_batch"):
        train._check_choice("model.remat", value, train.CHOICES["model.remat"])


def test_resume_across_remat_spellings_but_not_scan(tmp_path, monkeypatch):
    # A run saved with the old boolean resumes under the policy names: rematerialisation does
    # not change the checkpoint. Scanning does (stacked blocks), so it is refused like any other
    # model change, with the saved and the new value named.
    saved = config_utils.base_config()
    saved.model.remat = False
    saved.model.scan_blocks = False
    (tmp_path / "config.json").write_text(saved.to_json())
    monkeypatch.setattr(rerun.workdir_lib, "latest_step", lambda _: 5)
    new = config_utils.base_config()
    new.model.scan_blocks = False
    changes = rerun.check_same_config(tmp_path, new)
    assert changes == {"model.remat": (False, "none")}
    new.model.scan_blocks = True
    with pytest.raises(rerun.ConfigChanged, match="model.scan_blocks: False -> True"):
        rerun.check_same_config(tmp_path, new)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["remat"] is False
