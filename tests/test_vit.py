"""ViT / DINOv2: timm parity, position-embedding resampling, masking semantics, training knobs.

Models are built abstractly (`nnx.eval_shape`) and filled with seeded random values: eager
initialisation compiles every initializer op, and random values (not timm's zero biases and
tiny layer-scales) are what exposes bugs.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import models
from bgjax.models import masking as masking_lib
from bgjax.models import pos_embed, timm_io, vit

SIZE = 32  # px; vit_custom: patch 8 -> 4x4 grid, width 32, 2 heads, 2 blocks
TINY = dict(reg_tokens=2, no_embed_class=True, init_values=0.5)  # DINOv2-reg-like


def _random_value(path: tuple, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded by the parameter's path, so models differing elsewhere share equal-named tensors."""
    name = ".".join(str(p) for p in path)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if len(shape) >= 2:
        return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    if name.endswith("bias"):
        return 0.1 * rng.standard_normal(shape)
    return 1.0 + 0.25 * rng.standard_normal(shape)  # norm scales, layer-scale gammas


def build(seed: int = 0, **overrides) -> vit.VisionTransformer:
    """vit_custom(**TINY, **overrides) with random parameters and live drop-path RNGs."""
    model = nnx.eval_shape(lambda: vit.vit_custom(num_classes=5, **{**TINY, **overrides}))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(_random_value(path, shape), jnp.float32))
    nnx.update(model, state)
    rng_state = nnx.state(model, nnx.RngState)
    for i, (path, var) in enumerate(nnx.to_flat_state(rng_state)):
        if path[-1] == "key":
            var.set_value(jax.random.key(seed + i))
        else:
            var.set_value(jnp.zeros((), jnp.uint32))
    nnx.update(model, rng_state)
    return model


@nnx.jit
def outputs(model, x, mask):
    """logits, tokens after the final norm, block outputs: one compile per model config."""
    tokens, blocks = model.forward_intermediates(x, mask)
    return model(x, mask), tokens, blocks


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = np.stack(
        [
            (yy >= 5) & (yy < 21) & (xx >= 9) & (xx < 27),  # box cutting through patches
            (yy - 12) ** 2 + (xx - 19) ** 2 < 60,  # disc
        ]
    ).astype(np.uint8)
    # Same foreground, every background pixel different.
    x_bg = np.where(mask[..., None] > 0, x, 3 * rng.standard_normal(x.shape)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(x_bg), jnp.asarray(mask)


def _token_grids(mask):
    centre = np.asarray(masking_lib.patch_grid_mask(mask, 8, (4, 4), "centre")).reshape(2, -1)
    anyfg = np.asarray(masking_lib.patch_grid_mask(mask, 8, (4, 4), "any")).reshape(2, -1)
    return centre, anyfg


def test_token_grid_rules(data):
    _, _, mask = data
    centre, anyfg = _token_grids(mask)
    m = np.asarray(mask)
    for b in range(2):
        for t in range(16):
            i, j = divmod(t, 4)
            patch = m[b, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            assert centre[b, t] == patch[4, 4]
            assert anyfg[b, t] == patch.any()
    # The masks must exercise all cases: background, partial and full patches.
    assert (anyfg == 0).any() and (centre < anyfg).any() and (centre == 1).any()


# ------------------------------------------------------------------------------------------
# Masking semantics.


def test_early_and_attn_logits_invariant_to_background(data):
    x, x_bg, mask = data
    for masking in ("early", "attn"):
        model = build(masking=masking)
        a, b = outputs(model, x, mask)[0], outputs(model, x_bg, mask)[0]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=masking)
    # The perturbation matters when nothing masks it (so the check above has teeth), and late
    # masking is not invariant: attention mixed background in before the mask.
    for masking, mask_arg in (("none", None), ("late", mask)):
        model = build(masking=masking)
        a, b = outputs(model, x, mask_arg)[0], outputs(model, x_bg, mask_arg)[0]
        assert np.abs(np.asarray(a - b)).max() > 1e-3, masking


def test_attn_empty_foreground_is_finite(data):
    x, _, mask = data
    logits = outputs(build(masking="attn"), x, jnp.zeros_like(mask))[0]
    assert np.isfinite(np.asarray(logits)).all()


def test_late_masks_patch_tokens_only(data):
    x, _, mask = data
    plain_logits, plain, _ = outputs(build(masking="none"), x, None)
    late = build(masking="late")  # late_block=-1: after the last block and the final norm
    logits, tokens, _ = outputs(late, x, mask)
    centre, _ = _token_grids(mask)
    prefix = late.num_prefix_tokens
    assert prefix == 3
    tokens, plain = np.asarray(tokens), np.asarray(plain)
    # CLS and registers are never masked; foreground tokens untouched; background exactly 0.
    np.testing.assert_array_equal(tokens[:, :prefix], plain[:, :prefix])
    fg = centre[..., None] > 0
    np.testing.assert_array_equal(
        np.where(fg, tokens[:, prefix:], 0), np.where(fg, plain[:, prefix:], 0)
    )
    assert np.all(tokens[:, prefix:][~fg.repeat(32, -1)] == 0.0)
    # cls+gap is the default head for late masking: 2·D head input.
    assert late.head_pool == "cls+gap" and late.head.kernel.shape == (64, 5)
    assert logits.shape == plain_logits.shape == (2, 5)
    pooled = late.pool(jnp.asarray(tokens))
    np.testing.assert_allclose(pooled[:, :32], tokens[:, 0], rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 32:], tokens[:, prefix:].mean(1), rtol=1e-5, atol=1e-6)


@nnx.jit
def _late_second_last(model, x, mask):
    """The model's output and the same computation spelled out by hand."""
    tokens, blocks = model.forward_intermediates(x, mask)
    grid = masking_lib.patch_grid_mask(mask, 8, (4, 4), "centre").reshape(2, -1)
    scale = jnp.concatenate([jnp.ones((2, model.num_prefix_tokens)), grid], axis=1)
    by_hand = model.late_norm(blocks[-2]) * scale[..., None]
    return tokens, model.norm(model.blocks[-1](by_hand))


def test_late_second_last_block_uses_late_norm(data):
    x, _, mask = data
    model = build(masking="late", late_block=-2, depth=3)
    assert model.late_norm is not None
    tokens, by_hand = _late_second_last(model, x, mask)
    np.testing.assert_allclose(tokens, by_hand, rtol=1e-5, atol=1e-5)


def test_attn_background_gets_no_gradient(data):
    """With "attn", background patches are never read: their position embeddings get exactly
    zero gradient, foreground ones do not."""
    x, _, mask = data
    model = build(masking="attn")

    @nnx.jit
    def pos_grad(model):
        loss = lambda m: jnp.sum(m(x, mask) ** 2)
        return nnx.grad(loss)(model)["pos_embed"].get_value()

    grad = np.abs(np.asarray(pos_grad(model))[0]).sum(-1)  # (h*w,): no_embed_class grid rows
    _, anyfg = _token_grids(mask)
    fg_anywhere = anyfg.max(0) > 0
    assert np.all(grad[~fg_anywhere] == 0.0) and np.all(grad[fg_anywhere] > 0)


def _param_paths(state) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_frozen_backbone_filter(data):
    x, _, mask = data
    for kwargs in (dict(masking="none"), dict(masking="late", late_block=-1)):
        # masked after the last block, nothing but the head follows the mask (the paper's code)
        head_only = build(**kwargs)
        assert _param_paths(nnx.state(head_only, head_only.frozen_backbone_filter())) == {
            "head.kernel",
            "head.bias",
        }
    model = build(masking="late", late_block=-2, depth=3)
    trainable = model.frozen_backbone_filter()

    @nnx.jit
    def grads(model):
        loss = lambda m: jnp.sum(m(x, mask) ** 2)
        return nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)

    g = grads(model)
    paths = _param_paths(g)
    expected_roots = ("head.", "blocks.2.", "norm.", "late_norm.")
    assert all(p.startswith(expected_roots) for p in paths)
    n_expected = sum(
        p.startswith(expected_roots) for p in _param_paths(nnx.state(model, nnx.Param))
    )
    assert len(paths) == n_expected and any(p.startswith("late_norm.") for p in paths)
    for path, var in nnx.to_flat_state(g):
        assert np.abs(np.asarray(var.get_value())).max() > 0, path


# ------------------------------------------------------------------------------------------
# Training knobs: remat, drop-path, compute dtype.


def test_remat_and_drop_path(data):
    x, _, _ = data

    @nnx.jit(static_argnames="train")
    def loss_and_grads(model, train):
        loss = lambda m: jnp.sum(m(x, train=train) ** 2)
        return nnx.value_and_grad(loss)(model)

    plain = build(drop_path_rate=0.5)
    remat = build(drop_path_rate=0.5, remat=True)  # same parameters and RNG streams
    (loss, g), (loss_r, g_r) = loss_and_grads(plain, True), loss_and_grads(remat, True)
    np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_r)
    # Each training step draws new per-sample masks; evaluation is drop-path free.
    loss_again, _ = loss_and_grads(plain, True)
    assert abs(float(loss - loss_again)) > 1e-4
    np.testing.assert_allclose(outputs(plain, x, None)[0], outputs(build(), x, None)[0], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params(data):
    x, _, _ = data
    model = build(dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    logits, tokens, _ = outputs(model, x, None)
    ref = outputs(build(), x, None)[0]
    assert tokens.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.05 * float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------
# Construction, abstract shapes, errors.


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
)
def test_param_count_equals_timm(name):
    torch = pytest.importorskip("torch")
    from parity_utils import require_timm

    abstract = nnx.eval_shape(lambda: models.create(name, num_classes=1000))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # nothing allocated
    ours = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in require_timm().create_model(name).parameters())
    assert ours == theirs


def test_named_architectures_and_fsdp_metadata():
    for name in vit.MODELS:
        assert name in models.names()
    model = nnx.eval_shape(lambda: models.create("vit_base_patch14_reg4_dinov2", num_classes=3))
    assert model.grid_size == (37, 37) and model.reg_token.shape == (1, 4, 768)
    assert model.pos_embed.shape == (1, 37 * 37, 768)  # no_embed_class: no prefix slots
    assert model.blocks[0].ls1.gamma.shape == (768,)
    giant = nnx.eval_shape(
        lambda: models.create("vit_giant_patch14_dinov2", num_classes=0, depth=1)
    )
    assert giant.blocks[0].mlp.fc1.kernel.shape == (1536, 8192) and giant.head is None
    assert giant.blocks[0].mlp.fc2.kernel.shape == (4096, 1536)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert "fsdp" in tuple(specs["blocks"][0]["attn"]["qkv"]["kernel"].get_value())
    assert "fsdp" in tuple(specs["patch_embed"]["proj"]["kernel"].get_value())
    for replicated in (specs["head"]["kernel"], specs["norm"]["scale"], specs["pos_embed"]):
        assert tuple(replicated.get_value()) == ()


def test_dynamic_input_size_equals_resampled_weights(data):
    """Calling a 32 px model on 48x40 px resamples pos_embed on the fly; the same resampling
    applied to its weights (as a converter does) gives a 48x40 px model with equal logits."""
    x, _, _ = data
    big = jnp.tile(x, (1, 2, 2, 1))[:, :48, :40]  # 6x5 grid from a 4x4 position embedding
    small = build()
    dynamic = outputs(small, big, None)[0]
    fixed = build(img_size=(48, 40))
    assert fixed.pos_embed.shape == (1, 30, 32)
    timm_io.load_timm_state_dict(
        fixed, pos_embed.fit_pos_embed(fixed, timm_io.to_timm_state_dict(small))
    )
    np.testing.assert_allclose(outputs(fixed, big, None)[0], dynamic, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(data):
    x, _, mask = data
    with pytest.raises(ValueError, match="mask shape"):
        build(masking="early")(x, mask[:, :16])
    with pytest.raises(ValueError, match="masking='none'"):
        build(masking="none")(x, mask)
    with pytest.raises(ValueError, match="needs a foreground mask"):
        build(masking="attn")(x)
    with pytest.raises(ValueError, match="channels"):
        build()(x[..., :2])
    with pytest.raises(ValueError, match="unknown model"):
        models.create("vit_nonexistent_patch16_224", num_classes=3)
    with pytest.raises(ValueError, match="unknown masking"):
        vit.vit_custom(masking="later")
    with pytest.raises(ValueError, match="head_pool"):
        vit.vit_custom(head_pool="max")
    with pytest.raises(ValueError, match="late_block"):
        vit.vit_custom(masking="late", late_block=-3)
    with pytest.raises(ValueError, match="square"):
        pos_embed.resample_pos_embed(np.zeros((1, 1 + 12, 4), np.float32), (4, 4))


# ------------------------------------------------------------------------------------------
# timm parity.

PARITY = {
    # name: (timm kwargs, our extra overrides, image size)
    "vit_small": (
        "vit_small_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8),
        dict(dynamic_img_size=True),
        dict(pos_embed_antialias=True),  # timm's dynamic resize antialiases
        32,
    ),
    "dinov2_reg4": (
        "vit_small_patch14_reg4_dinov2",
        dict(depth=2, embed_dim=64, num_heads=2, img_size=42),
        {},
        {},
        42,
    ),
    "dinov2_giant_gap": (  # SwiGLU MLP; gap == timm global_pool="avg" without fc_norm
        "vit_giant_patch14_dinov2",
        dict(depth=1, embed_dim=48, num_heads=2, img_size=28),
        dict(global_pool="avg", fc_norm=False),
        dict(head_pool="gap"),
        28,
    ),
}


@pytest.fixture(scope="module", params=sorted(PARITY))
def parity_pair(request):
    from parity_utils import randomize_torch_model, state_dict_numpy, timm_model

    name, kwargs, timm_only, ours_only, size = PARITY[request.param]
    theirs = randomize_torch_model(timm_model(name, num_classes=7, **kwargs, **timm_only), 0)
    ours = nnx.eval_shape(lambda: models.create(name, num_classes=7, **kwargs, **ours_only))
    timm_io.load_timm_state_dict(ours, state_dict_numpy(theirs))
    return theirs, ours, size


def _timm_blocks(model, x_nhwc):
    import torch

    outs = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: outs.append(o.numpy())) for b in model.blocks
    ]
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    for h in hooks:
        h.remove()
    return logits.numpy(), outs


@pytest.mark.parity
def test_logits_and_blocks_match_timm(parity_pair):
    from parity_utils import random_images, state_dict_numpy

    theirs, ours, size = parity_pair
    sizes = (size, size + 16) if theirs.dynamic_img_size else (size,)
    for s in sizes:  # the second size resamples the position embedding on the fly
        x = random_images(2, s, seed=s)
        ref_logits, ref_blocks = _timm_blocks(theirs, x)
        logits, _, blocks = outputs(ours, jnp.asarray(x), None)
        assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4
        for ref, got in zip(ref_blocks, blocks, strict=True):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    back = timm_io.to_timm_state_dict(ours)
    ref = state_dict_numpy(theirs)
    assert back.keys() == ref.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parity
@pytest.mark.parametrize("antialias", [False, True])
def test_resample_pos_embed_matches_timm(antialias):
    torch = pytest.importorskip("torch")
    from parity_utils import require_timm

    require_timm()
    from timm.layers import resample_abs_pos_embed

    rng = np.random.default_rng(1)
    # up, down (DINOv2 518 -> 224 px), non-square both ways, with 0/1/5 prefix tokens
    for old, new, prefix in [((4, 4), (7, 5), 1), ((37, 37), (16, 16), 0), ((5, 3), (2, 9), 5)]:
        pos = rng.standard_normal((1, prefix + old[0] * old[1], 8)).astype(np.float32)
        ref = resample_abs_pos_embed(
            torch.from_numpy(pos), list(new), list(old), num_prefix_tokens=prefix,
            antialias=antialias,
        ).numpy()  # fmt: skip
        ours = pos_embed.resample_pos_embed(pos, new, old, prefix, antialias=antialias)
        traced = jax.jit(
            functools.partial(
                pos_embed.resample_pos_embed,
                new_grid=new,
                old_grid=old,
                num_prefix_tokens=prefix,
                antialias=antialias,
            )  # fmt: skip
        )
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(traced(jnp.asarray(pos)), ref, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ours[:, :prefix], pos[:, :prefix])


def test_sincos2d_pos_embed_init():
    model = vit.vit_custom(num_classes=3, pos_embed_init="sincos2d", rngs=nnx.Rngs(0))
    default = nnx.eval_shape(lambda: vit.vit_custom(num_classes=3))
    pos = np.asarray(model.pos_embed[...])[0]
    assert pos.shape == default.pos_embed.shape[1:]  # same parameter, timm-exportable
    assert isinstance(model.pos_embed, nnx.Param)  # trainable: only the start differs
    np.testing.assert_array_equal(pos[0], 0.0)  # the class token carries no position
    grid = pos[1:]
    h, w = model.grid_size
    # Nearer grid positions have more similar codes; every position is distinct.
    sims = grid @ grid[0]
    assert sims[1] > sims[2] and sims[w] > sims[2 * w]
    assert len({tuple(np.round(r, 5)) for r in grid}) == h * w
    with pytest.raises(ValueError, match="divisible by 4"):
        pos_embed.sincos_2d_pos_embed((2, 2), 6)
    with pytest.raises(ValueError, match="pos_embed_init"):
        vit.vit_custom(pos_embed_init="random")
