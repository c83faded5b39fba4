"""Remat policies and scanned blocks (`bgjax.models.stacking`): the same numbers and names as
the unrolled, remat-free model, and the compiled programs they promise (a loop; recomputation).

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
# Scanned = unrolled: values, gradients, drop-path masks, names.


@pytest.mark.parametrize("make", [make_vit, make_stage], ids=["vit", "convnext_stage"])
def test_scanned_blocks_match_unrolled_with_drop_path(make):
    # Rates 0, .2, .4: the first block has no drop-path module, the others their own streams.
    kw = dict(drop_path_rate=0.4) if make is make_vit else {}
    x = X if make is make_vit else jnp.tile(X, (1, 1, 1, 3))[..., :8]
    unrolled, scanned = make(**kw), make(**kw, scan_blocks=True)
    loss, grads = loss_and_grads(unrolled, x, True)
    loss_s, grads_s = loss_and_grads(scanned, x, True)
    _assert_close(loss_s, loss, 1e-6)
    _assert_close(nnx.to_pure_dict(grads_s), nnx.to_pure_dict(grads), 1e-5)
    # Each block's stream advanced as far as unrolled: the next step draws the same masks too.
    counts = _rng_counts(scanned)
    assert counts == _rng_counts(unrolled)
    calls = type(unrolled.blocks[0]).drop_path_calls
    assert sorted(int(c) for c in jax.tree.leaves(counts)) == [calls, calls]


def test_scanned_vit_intermediates_and_late_masking():
    # Late masking before the last of 3 blocks splits the stack: blocks 0-1 scanned, late_norm,
    # block 2.
    kw = dict(masking="late", late_block=-2)
    unrolled, scanned = make_vit(**kw), make_vit(**kw, scan_blocks=True)
    mask = jnp.zeros((2, 32, 32)).at[:, 8:24, 4:20].set(1.0)
    run = nnx.jit(lambda m: (m(X, mask), *m.forward_intermediates(X, mask)))
    (logits, tokens, blocks), (logits_s, tokens_s, blocks_s) = run(unrolled), run(scanned)
    assert len(blocks_s) == len(blocks) == 3
    _assert_close((logits_s, tokens_s, blocks_s), (logits, tokens, blocks), 1e-5)


@pytest.mark.parametrize("make", [make_vit, make_convnext], ids=["vit", "convnext"])
def test_scan_keeps_timm_names(make):
    unrolled, scanned = make(), make(scan_blocks=True)
    names = lambda m: [p for p, _ in nnx.to_flat_state(nnx.state(m))]
    assert names(scanned) == names(unrolled)
    exported = timm_io.to_timm_state_dict(scanned)
    assert exported.keys() == timm_io.to_timm_state_dict(unrolled).keys()
    block = "blocks.2.attn.qkv.weight" if make is make_vit else "stages.1.blocks.2.mlp.fc1.weight"
    assert block in exported
    reloaded = make(scan_blocks=True)
    timm_io.load_timm_state_dict(reloaded, exported)  # timm names in, into a scanned model
    _assert_close(nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)),
                  nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))  # fmt: skip


def test_scan_refuses_blocks_of_other_shapes():
    blocks = [make_vit(embed_dim=32).blocks[0], make_vit(embed_dim=16, num_heads=2).blocks[0]]
    with pytest.raises(ValueError, match="block 1 of 2 .Block. differs from block 0"):
        stacking.scan_blocks(blocks, jnp.zeros((1, 17, 32)), lambda b, x, drop: b(x, drop=drop))


# ------------------------------------------------------------------------------------------
# Remat policies.


@functools.cache
def grad_program(remat: str = "none", scan_blocks: bool = False):
    """(loss, grads, lowered StableHLO, compiled HLO) of d(sum of squared logits)/d(params) of
    a 2-block ViT; each setting compiled once for the tests below."""
    model = make_vit(depth=2, remat=remat, scan_blocks=scan_blocks)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(X) ** 2)
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
    compiled = lowered.compile()
    value, grads = compiled(params)
    return value, nnx.to_pure_dict(grads), lowered.as_text(), compiled.as_text()


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


def test_resume_across_remat_spellings_and_scan(tmp_path, monkeypatch):
    # A run saved with the old boolean resumes under the policy names and with scanning on: how
    # the blocks run does not change the checkpoint. Another model change is still refused.
    saved = config_utils.base_config()
    saved.model.remat = False
    (tmp_path / "config.json").write_text(saved.to_json())
    monkeypatch.setattr(rerun.workdir_lib, "latest_step", lambda _: 5)
    new = config_utils.base_config()
    new.model.scan_blocks = True
    changes = rerun.check_same_config(tmp_path, new)
    assert changes == {"model.remat": (False, "none")}
    new.model.masking = "early"
    with pytest.raises(rerun.ConfigChanged, match="model.masking"):
        rerun.check_same_config(tmp_path, new)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["remat"] is False
