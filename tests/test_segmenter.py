"""The binary segmenter, its loss and metrics, and predicted-mask sources (`bgjax.masks`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bgjax import config_utils, evaluate, masks, models, parallel, train, train_state
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.models import segmenter as seg
from bgjax.models import timm_io

CONFIGS = config_utils.CONFIGS_DIR
# Grouped depthwise convs: one op each, where CPU's default "shifted" form is 49 (eager tests).
ENCODER_ARCH = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), dw_impl="grouped")
TINY_CONVNEXT = dict(ENCODER_ARCH, decoder_dim=8, refine_dim=4)
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_dim=8,
                refine_dim=4)  # fmt: skip


def _rngs(seed: int) -> nnx.Rngs:
    # The "rbg" generator compiles ~3x faster than threefry on CPU, and every parameter shape
    # of a freshly built model compiles its own initialiser.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@nnx.jit
def _logits(model, x):
    """The forward pass, compiled once: eager mode compiles every op separately (slow on CPU)."""
    return model(x)


# ---------------------------------------------------------------------------------------------
# Loss and metrics, exact on hand-built masks.


def test_confusion_counts_and_iou_are_exact_and_skip_invalid_rows():
    target = np.zeros((3, 4, 4), np.uint8)
    target[0, :2] = 1  # 8 foreground pixels
    pred = np.zeros_like(target)
    pred[0, 1:3] = 1  # 4 hit, 4 false alarm, 4 missed, 4 true background
    pred[2] = 1  # an invalid (padding) row, all wrong: must not count
    valid = np.array([True, True, False])
    counts = seg.confusion_counts(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid))
    assert {k: int(v) for k, v in counts.items()} == dict(tp=4, fp=4, fn=4, tn=20)
    m = seg.iou_metrics(counts)
    assert m["fg_iou"] == pytest.approx(4 / 12)
    assert m["bg_iou"] == pytest.approx(20 / 28)
    assert m["miou"] == pytest.approx((4 / 12 + 20 / 28) / 2)
    assert m["pixel_accuracy"] == pytest.approx(24 / 32)


def test_iou_of_an_absent_class_predicted_absent_is_one():
    empty = jnp.zeros((1, 2, 2), jnp.uint8)
    m = seg.iou_metrics(seg.confusion_counts(empty, empty))
    assert m == dict(fg_iou=1.0, bg_iou=1.0, miou=1.0, pixel_accuracy=1.0)


def test_bce_and_dice_match_their_formulas_with_valid_weighting():
    logits = jnp.array([[[2.0, -1.0]], [[0.0, 3.0]], [[50.0, 50.0]]])  # (3, 1, 2)
    target = jnp.array([[[1, 0]], [[1, 1]], [[0, 0]]], jnp.uint8)
    valid = jnp.array([True, True, False])
    p = lambda z: 1 / (1 + np.exp(-z))
    bce = lambda z, t: -(t * np.log(p(z)) + (1 - t) * np.log(1 - p(z)))
    row0 = (bce(2.0, 1) + bce(-1.0, 0)) / 2
    row1 = (bce(0.0, 1) + bce(3.0, 1)) / 2
    assert float(seg.bce_loss(logits, target, valid)) == pytest.approx((row0 + row1) / 2, 1e-6)
    dice0 = (2 * p(2.0) + 1) / (p(2.0) + p(-1.0) + 1 + 1)
    dice1 = (2 * (p(0.0) + p(3.0)) + 1) / (p(0.0) + p(3.0) + 2 + 1)
    expected_dice = ((1 - dice0) + (1 - dice1)) / 2
    assert float(seg.dice_loss(logits, target, valid)) == pytest.approx(expected_dice, 1e-6)
    total = seg.segmentation_loss(logits, target, valid, dice_weight=0.5)
    assert float(total) == pytest.approx((row0 + row1) / 2 + 0.5 * expected_dice, 1e-6)
    # Without `valid` the saturated wrong row counts and dominates.
    assert float(seg.bce_loss(logits, target)) > 10


def test_predict_mask_thresholds_the_sigmoid_at_one_half():
    logits = jnp.array([[-3.0, -1e-4, 1e-4, 5.0]])
    np.testing.assert_array_equal(seg.predict_mask(logits), [[0, 0, 1, 1]])
    assert seg.predict_mask(logits).dtype == jnp.uint8


# ---------------------------------------------------------------------------------------------
# The model.


@pytest.fixture(scope="module")
def convnext_segmenter():
    return seg.create("convnext_atto", rngs=_rngs(0), **TINY_CONVNEXT)


@pytest.mark.parametrize("encoder, overrides", [("convnext_atto", TINY_CONVNEXT),
                                                ("vit_tiny_patch16_224", TINY_VIT)])  # fmt: skip
def test_segmenter_gives_one_logit_per_input_pixel(encoder, overrides):
    model = seg.create(encoder, rngs=_rngs(0), **overrides)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    logits = _logits(model, x)
    assert logits.shape == (2, 32, 32) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # Per-pixel, not constant: the refinement sees the image at full resolution.
    assert float(jnp.std(logits[0])) > 0


def test_encoder_keeps_timm_names_and_loads_a_timm_state_dict(convnext_segmenter):
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(convnext_segmenter))}
    assert "encoder.stem.0.kernel" in paths and "encoder.stages.1.downsample.1.kernel" in paths
    assert not any(p.startswith("encoder.head") for p in paths)  # headless
    donor = models.create("convnext_atto", 5, rngs=_rngs(7), **ENCODER_ARCH)
    weights = timm_io.to_timm_state_dict(donor)
    assert "head.fc.weight" in weights
    model = seg.create("convnext_atto", rngs=_rngs(0), **TINY_CONVNEXT)
    seg.load_timm_encoder(model, weights)
    np.testing.assert_array_equal(model.encoder.stem[0].kernel[...], donor.stem[0].kernel[...])
    # A prebuilt encoder (e.g. from models.from_timm) is used as is.
    wrapped = seg.Segmenter(donor, rngs=_rngs(0), decoder_dim=8, refine_dim=4)
    assert wrapped.encoder is donor


def test_frozen_backbone_trains_only_the_decoder(convnext_segmenter):
    trainable = nnx.state(convnext_segmenter, convnext_segmenter.frozen_backbone_filter())
    paths = [p for p, _ in nnx.to_flat_state(trainable)]
    assert paths and all(p[0] == "decoder" for p in paths)


def test_segmenter_rejects_a_masking_encoder():
    with pytest.raises(ValueError, match="masking='early'"):
        seg.create("convnext_atto", masking="early", **TINY_CONVNEXT)


# ---------------------------------------------------------------------------------------------
# Mask sources.


def test_gt_source_passes_the_batch_masks_through():
    source = workdir_lib.load_mask_source("gt", mean=(0.5,) * 3, std=(0.25,) * 3)
    batch = dict(mask=jnp.ones((2, 4, 4), jnp.uint8))
    assert source.is_gt and source.params is None
    assert source.masks(None, batch, jnp.zeros((2, 4, 4, 3))) is batch["mask"]


def test_predicted_masks_inside_jit_with_params_as_argument(convnext_segmenter):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    source = masks.from_model(convnext_segmenter, mean=mean, std=std)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    expected = seg.predict_mask(_logits(convnext_segmenter, x))

    @jax.jit
    def step(params, images):
        return source.masks(params, {"mask": None}, images)

    got = step(source.params, x)
    assert got.shape == (2, 32, 32) and got.dtype == jnp.uint8
    np.testing.assert_array_equal(got, expected)
    assert 0 < float(expected.mean()) < 1  # the check above is not vacuous

    # Frozen: no gradient reaches the segmenter's parameters through the masks.
    def loss(params):
        return jnp.sum(source.predict(params, x).astype(jnp.float32) * x[..., 0])

    grads = jax.jit(jax.grad(loss))(source.params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads) if g.size)


def test_segmenter_with_other_normalisation_sees_its_own_pixels(convnext_segmenter):
    cls_mean, cls_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    seg_mean, seg_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
    cls_x = (pixels - jnp.array(cls_mean)) / jnp.array(cls_std)
    seg_x = (pixels - jnp.array(seg_mean)) / jnp.array(seg_std)
    source = masks.from_model(
        convnext_segmenter, mean=cls_mean, std=cls_std, segmenter_mean=seg_mean,
        segmenter_std=seg_std,
    )  # fmt: skip
    assert source.scale is not None
    logits_direct = _logits(convnext_segmenter, seg_x)
    merged = nnx.merge(source.graphdef, source.params)
    renormalised = cls_x * jnp.array(source.scale) + jnp.array(source.shift)
    np.testing.assert_allclose(_logits(merged, renormalised), logits_direct, atol=1e-4)


def _fake_workdir(path, *, task="segment", image_size=32):
    config = config_utils.load_config(f"{CONFIGS / 'segmenter.py'}:size=tiny")
    config.task = task
    config.data.image_size = image_size
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json())
    info = dict(name="synthetic", class_names=["a"], habitat_names=None, image_size=image_size,
                mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    (path / "dataset_info.json").write_text(json.dumps(info))
    return path


def test_segmenter_workdir_errors_name_the_path_or_sizes(tmp_path):
    kwargs = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        workdir_lib.load_mask_source(str(missing), **kwargs)
    no_ckpt = _fake_workdir(tmp_path / "seg_no_ckpt")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*seg_no_ckpt/checkpoints"):
        workdir_lib.load_mask_source(str(no_ckpt), **kwargs)
    classifier = _fake_workdir(tmp_path / "cls", task="classify")
    with pytest.raises(ValueError, match="not a segmenter"):
        workdir_lib.load_mask_source(str(classifier), **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        workdir_lib.load_mask_source(str(empty), **kwargs)


# ---------------------------------------------------------------------------------------------
# End to end through the trainer: train the segmenter, score it, feed its masks to a classifier.


def _config(spec, overrides=None):
    config = config_utils.load_config(spec)
    config.update_from_flattened_dict({"progress_bar": False, **(overrides or {})})
    return config


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory):
    """segmenter.py:size=tiny trained by `bgjax.train` (32 px, 150 steps)."""
    workdir = tmp_path_factory.mktemp("segmenter")
    summary = train.train(_config(f"{CONFIGS / 'segmenter.py'}:size=tiny"), str(workdir))
    return workdir, summary


@pytest.mark.slow
def test_trained_segmenter_finds_the_synthetic_objects(segmenter_run):
    workdir, summary = segmenter_run
    assert summary["eval/original/fg_iou"] >= 0.85, summary
    assert summary["eval/original/miou"] > summary["eval/original/fg_iou"]
    # `bgjax eval` on the workdir: the trainer's numbers on the same split, written to disk.
    out = workdir / "eval_out"
    results = evaluate.evaluate_checkpoint(
        workdir, variant_names=("original", "only_bg_t"), split="val", out_dir=out
    )
    assert results["task"] == "segment" and results["skipped_variants"] == ["only_bg_t"]
    for name in seg.METRICS:
        assert results[name] == pytest.approx(summary[f"eval/original/{name}"], abs=1e-6)
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"]["original"]["miou"] == pytest.approx(results["miou"])
    assert "fg IoU" in (out / "results.md").read_text()


@pytest.mark.slow
def test_predicted_masks_drive_early_masking_in_the_classifier(segmenter_run, tmp_path):
    seg_dir, _ = segmenter_run
    overrides = {"mask_source": str(seg_dir), "total_steps": 2, "optimizer.warmup_steps": 1,
                 "checkpoint.every_steps": 2, "eval.every_steps": 0}  # fmt: skip
    config = _config(f"{CONFIGS / 'synthetic.py'}:arch=vit,size=tiny,strategy=early", overrides)
    summary = train.train(config, str(tmp_path / "cls"))
    assert summary["step"] == 2

    # The logged step-1 loss is the loss under the SEGMENTER's masks (recomputed by hand from
    # the initial parameters and the first batch), not under the ground-truth masks.
    source = data_lib.get_source(config.data, "train")
    info = source.info
    mesh = parallel.make_mesh(config.mesh)
    setup = train_state.make_setup(config, info, mesh)
    state = setup.init()
    model = nnx.merge(setup.graphdef, state["params"], state["rest"])
    first = pipeline.build(
        source, batch_size=config.batch_size, image_size=32, train=True, seed=config.seed
    )
    batch = next(iter(first))
    images = pipeline.normalize(jnp.asarray(batch["image"]), info.mean, info.std)
    mask_source = workdir_lib.load_mask_source(str(seg_dir), mean=info.mean, std=info.std)
    predicted = jax.jit(mask_source.predict)(mask_source.params, images)
    labels = jax.nn.one_hot(batch["label"], info.num_classes)

    @nnx.jit
    def masked_loss(model, mask):
        logits = model(images, mask=mask, train=True)
        return optax.softmax_cross_entropy(logits, labels).mean()

    loss = lambda mask: float(masked_loss(model, jnp.asarray(mask)))

    logged = json.loads((tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    with_predicted, with_gt = loss(predicted), loss(batch["mask"])
    assert abs(with_predicted - with_gt) > 1e-5  # the masks differ enough to tell apart
    assert abs(logged["train/loss"] - with_predicted) < 0.1 * abs(with_predicted - with_gt)
    # The segmenter found the objects of this very batch.
    iou = seg.iou_metrics(seg.confusion_counts(predicted, jnp.asarray(batch["mask"])))["fg_iou"]
    assert iou > 0.8

    # `bgjax eval` says where the masks came from, and scores ground-truth masks alongside.
    results = evaluate.evaluate_checkpoint(
        tmp_path / "cls", variant_names=("original",), split="val", out_dir=tmp_path / "ev"
    )
    assert results["mask_source"] == str(seg_dir)
    assert results["mask_source_kind"] == "segmenter"
    assert set(results["gt_masks"]["variants"]) == {"original"}

    # A classifier at another size (64 px) gets the 32-px segmenter's masks of its images
    # resized to 32 px, brought back to 64 px: the same objects.
    big = jax.image.resize(images, (images.shape[0], 64, 64, 3), "nearest")
    at_64 = jax.jit(mask_source.predict)(mask_source.params, big)
    assert at_64.shape == (images.shape[0], 64, 64)
    upsampled = jnp.repeat(jnp.repeat(predicted, 2, axis=1), 2, axis=2)
    agree = seg.iou_metrics(seg.confusion_counts(at_64, upsampled))["fg_iou"]
    assert agree > 0.9, agree
