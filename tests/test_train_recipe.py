"""The masking paper's training protocol (Aniraj et al., ICCVW 2023; its released code): which
parameters a frozen backbone trains, which learn at the head's rate, weight-decay groups, early
masking before mixup, and the paper's configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import config_utils, optim, parallel, tasks, train_state, train_step
from bgjax import data as data_lib
from bgjax.data import pipeline
from bgjax.models import masking as masking_lib
from bgjax.tasks import classify

TINY_VIT = "synthetic.py:arch=vit,size=tiny"


def _model(arch: str, masking: str, **overrides):
    """The abstract tiny model of `arch` (ViT: 2 blocks, so both late positions exist)."""
    config = config_utils.load_config(f"synthetic.py:arch={arch},size=tiny")
    config.model.masking = masking
    config.model.update(dict(depth=2) if arch == "vit" else {}, **overrides)
    return nnx.eval_shape(lambda: tasks.make_model(config, num_classes=4))


def _paths(state) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


# (arch, masking, late position) -> the top-level modules that train with a frozen backbone and
# learn at the head's rate: the head, plus what follows a mask placed before the last ViT block
# (late_block=-2) or the last ConvNeXt stage (late_stage=3), as the paper's code does.
CASES = [
    ("vit", "none", {}, {"head"}),
    ("vit", "early", {}, {"head"}),
    ("vit", "late", dict(late_block=-1), {"head"}),
    ("vit", "late", dict(late_block=-2), {"head", "blocks.1", "norm", "late_norm"}),
    ("convnext", "none", {}, {"head"}),
    ("convnext", "early", {}, {"head"}),
    ("convnext", "late", dict(late_stage=3), {"head", "stages.3"}),
    ("convnext", "late", dict(late_stage=4), {"head"}),
]


@pytest.mark.parametrize("arch, masking, position, modules", CASES)
def test_frozen_backbone_trains_exactly_the_papers_parameters(arch, masking, position, modules):
    model = _model(arch, masking, **position)
    config = config_utils.load_config(f"synthetic.py:arch={arch},size=tiny")
    config.model.frozen_backbone = True
    trained = _paths(nnx.state(model, train_state.trainable_filter(model, config)))
    every = _paths(nnx.state(model, nnx.Param))
    expected = {p for p in every if any(p.startswith(m + ".") for m in modules)}
    assert trained == expected
    assert not trained & {"cls_token", "pos_embed", "patch_embed.proj.kernel", "stem.0.kernel"}
    if "late_norm" in modules:  # the last block, its norms and the final norm all train
        assert {"blocks.1.norm1.scale", "late_norm.scale", "norm.scale"} <= trained
        assert not any(p.startswith("blocks.0.") for p in trained)
    if "stages.3" in modules:
        assert {"stages.3.downsample.0.scale", "head.norm.scale", "head.fc.kernel"} <= trained
    if arch == "convnext":  # timm's head: its norm trains with the classifier
        assert "head.norm.scale" in trained


def _ones_like(model):
    params = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)


def _second_update(tx, params, grads):
    """Adam's update at step 1 (step 0 is warm-up's lr 0)."""
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    return tx.update(grads, state, params)[0]


@pytest.mark.parametrize("arch, masking, position, modules", CASES)
def test_boosted_lr_group_holds_the_head_and_the_retrained_parts(arch, masking, position, modules):
    model = _model(arch, masking, **position)
    params = _ones_like(model)
    cfg = config_utils.base_config().optimizer
    cfg.update(lr=1e-2, wd=0.0, warmup_steps=1, clip_norm=0.0, head_lr_mult=10.0)
    tx, _ = optim.make(cfg, total_steps=10, head_prefixes=train_state.head_prefixes(model))
    updates = _second_update(tx, params, jax.tree.map(jnp.ones_like, params))
    # Adam's step on constant gradients is the learning rate: 1e-2, or 10x that when boosted.
    rates = {
        ".".join(map(str, path)): float(np.abs(np.asarray(u.get_value())).max()) / 1e-2
        for path, u in nnx.to_flat_state(updates)
    }
    expected = {p for p in rates if any(p.startswith(m + ".") for m in modules)}
    assert {p for p, r in rates.items() if r == pytest.approx(10.0, rel=1e-3)} == expected
    assert all(r == pytest.approx(1.0, rel=1e-3) for p, r in rates.items() if p not in expected)


def test_weight_decay_groups():
    model = _model("vit", "late", late_block=-2)
    params = _ones_like(model)
    zeros = jax.tree.map(jnp.zeros_like, params)
    cfg = config_utils.base_config().optimizer
    cfg.update(lr=1e-2, wd=0.5, warmup_steps=1, clip_norm=0.0)

    def decayed(wd_params):
        cfg.wd_params = wd_params
        tx, _ = optim.make(cfg, total_steps=10)
        updates = _second_update(tx, params, zeros)  # zero gradients: the update is the decay
        return {
            ".".join(map(str, p)) for p, u in nnx.to_flat_state(updates) if np.any(u.get_value())
        }

    every = _paths(params)
    assert decayed("all") == every  # torch AdamW over plain groups: the masking paper's code
    kernels = decayed("kernels")
    assert {"head.kernel", "blocks.0.attn.qkv.kernel"} <= kernels
    assert not kernels & {"head.bias", "norm.scale", "late_norm.bias", "cls_token", "pos_embed"}
    cfg.wd_params = "some"
    with pytest.raises(ValueError, match=r"optimizer.wd_params='some'"):
        optim.make(cfg, total_steps=10)


# ---------------------------------------------------------------------------------------------
# Early masking before mixup.


def test_mixup_blends_images_already_masked():
    """Pixels in exactly one foreground show that image at weight lam and the fill (black) for
    the other image, never the other image's background; the model's own masking with the mixed
    (union) mask then changes nothing."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:10, 2:10] = 1
    masks[1, 6:14, 6:14] = 1
    fill = jnp.asarray(masking_lib.early_fill_value("black", (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)))
    premasked = masking_lib.early_mask(images, masks, fill)
    mixed, mixed_masks, soft = classify.mix_batch(
        jax.random.key(0), premasked, jnp.asarray(masks), jnp.eye(2),
        mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5,
    )  # fmt: skip
    lam = float(soft[0, 0])
    assert 0.0 < lam < 1.0
    only_0 = (masks[0] == 1) & (masks[1] == 0)
    only_1 = (masks[1] == 1) & (masks[0] == 0)
    assert only_0.any() and only_1.any()
    np.testing.assert_allclose(
        mixed[0][only_0], lam * images[0][only_0] + (1 - lam) * fill, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        mixed[0][only_1], lam * fill + (1 - lam) * images[1][only_1], rtol=1e-5, atol=1e-6
    )
    outside = (masks[0] == 0) & (masks[1] == 0)
    np.testing.assert_allclose(mixed[0][outside], np.broadcast_to(fill, (outside.sum(), 3)), 1e-6)
    remasked = masking_lib.early_mask(mixed, mixed_masks, fill)
    np.testing.assert_allclose(remasked, mixed, rtol=0, atol=1e-6)


def test_train_step_mixes_early_masked_images():
    """With early masking and mixup, a train step sees exactly what it would if the images'
    backgrounds were black already (the paper's code masks the images, then mixes them)."""
    config = config_utils.load_config(TINY_VIT)
    config.progress_bar = False
    config.model.masking = "early"
    config.loss.update(mixup_alpha=0.8, cutmix_alpha=0.0)
    source = data_lib.get_source(config.data, "train")
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
    setup = train_state.make_setup(config, source.info, mesh)
    assert setup.premask_fill is not None
    batch = next(
        iter(
            pipeline.build(
                source, batch_size=config.batch_size, image_size=config.data.image_size,
                train=True, seed=config.seed, num_devices=1,
            )
        )
    )  # fmt: skip
    black = dict(batch, image=batch["image"] * batch["mask"][..., None].astype(np.uint8))
    assert np.any(black["image"] != batch["image"])
    step = train_step.jit_train_step(config, setup, source.info, mesh)
    loss = lambda b: float(
        parallel.fetch(step(setup.init(), pipeline.to_global(b, mesh), None)[1])["loss"]
    )
    np.testing.assert_allclose(loss(batch), loss(black), rtol=1e-6)  # the leak: ~4e-4


# ---------------------------------------------------------------------------------------------
# The paper's configs.


@pytest.mark.parametrize("name", ["cub.py", "waterbirds.py"])
@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_paper_configs_use_the_reference_recipe(name, mode):
    for arch, strategies in (("vit", ("none", "early", "late")), ("convnext", ("none", "late"))):
        for strategy in strategies:
            config = config_utils.load_config(f"{name}:arch={arch},strategy={strategy},mode={mode}")
            assert config.optimizer.clip_norm == 0.0 and config.optimizer.wd_params == "all"
            if arch == "vit":  # the same head for baseline, early and late
                assert config.model.head_pool == "cls+gap"
                model = nnx.eval_shape(lambda c=config: tasks.make_model(c, num_classes=200))
                assert model.head_pool == "cls+gap"
            else:
                assert "head_pool" not in config.model
            if name == "cub.py":
                assert config.loss.label_smoothing == 0.1  # frozen runs too
                assert config.optimizer.min_lr_ratio * config.optimizer.lr == pytest.approx(
                    1e-8 if (arch, mode) == ("vit", "finetune") else 1e-6
                )
