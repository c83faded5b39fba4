"""Saliency maps and the foreground saliency fraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import parallel
from bgjax.analysis import saliency
from bgjax.data import pipeline
from bgjax.masks import apply_model
from bgjax.models import convnext, vit

SIZE, N = 32, 6  # 6 images over 4 devices: the last batch is padded
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_convnext(masking):
    return convnext.ConvNeXt(
        depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=3, rngs=nnx.Rngs(0),
        masking=masking, pixel_mean=MEAN, pixel_std=STD, ls_init_value=1.0, dw_impl="grouped",
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((N, SIZE, SIZE), np.uint8)
    for i in range(N):
        masks[i, 4 + i : 20 + i, 6 : 22 + i] = 1
    return images, masks, np.arange(N) % 3


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh([("data", -1)])


# Eager gradients dispatch (and compile) op by op: much slower than one jitted call.
jitted_grad_cam = jax.jit(saliency.grad_cam, static_argnums=(0, 5, 6))


def test_early_masking_puts_all_input_saliency_on_the_foreground(data, mesh):
    images, masks, labels = data

    def maps_of(model):  # both methods run end to end in test_evaluate's trained-workdir test
        return saliency.saliency_maps(
            model, images, masks, labels, mesh=mesh, mean=MEAN, std=STD, batch_size=4,
            methods=("input_gradient",),
        )  # fmt: skip

    vit_kwargs = dict(num_classes=3, img_size=SIZE, pixel_mean=MEAN, pixel_std=STD)
    early = maps_of(vit.vit_custom(masking="early", **vit_kwargs))
    plain = maps_of(vit.vit_custom(masking="none", **vit_kwargs))
    for maps in (early, plain):
        assert set(maps) == {"input_gradient"}
        assert maps["input_gradient"].shape == (N, SIZE, SIZE)
        assert np.all(maps["input_gradient"] >= 0)
    fractions = np.asarray(saliency.foreground_fraction(early["input_gradient"], masks))
    np.testing.assert_array_equal(fractions, 1.0)  # background gradient is exactly zero
    assert np.all(early["input_gradient"][masks == 0] == 0)
    report = saliency.summarize(plain, masks)
    plain_fraction = report["methods"]["input_gradient"]["foreground_fraction"]
    assert plain_fraction < 0.9
    assert saliency.summarize(early, masks)["methods"]["input_gradient"]["foreground_fraction"] == 1
    assert 0 < report["mask_area_fraction"] < 1


def test_grad_cam_equals_the_gradient_of_the_head_on_convnext_features(data, mesh):
    model = tiny_convnext("none")
    images, masks, labels = data
    x = pipeline.normalize(jnp.asarray(images), MEAN, STD)
    graphdef, state = nnx.split(model)
    # Stage 3 of 4 (a 2x2 grid at 32 px): the tap's gradient flows through the last stage.
    layer = -2
    cam = jitted_grad_cam(graphdef, state, x, None, jnp.asarray(labels), apply_model, layer)

    @jax.jit
    def expected_cam(state, x):
        model = nnx.merge(graphdef, state)
        features = model.forward_intermediates(x)["stages.2"]

        def score(a):
            logits = model.head(model.pool(model.stages[3](a)))
            return jnp.take_along_axis(logits, jnp.asarray(labels)[:, None], axis=1).sum()

        grads = jax.grad(score)(features)
        return jax.nn.relu((grads.mean(axis=(1, 2), keepdims=True) * features).sum(-1))

    expected = expected_cam(state, x)
    assert cam.shape == (N, SIZE // 16, SIZE // 16)
    assert float(expected.max()) > 0
    np.testing.assert_allclose(np.asarray(cam), np.asarray(expected), rtol=1e-5, atol=1e-7)


def test_grad_cam_on_a_cls_pooled_vit_reads_the_patch_grid(data, mesh):
    model = vit.vit_custom(num_classes=3, img_size=SIZE, head_pool="cls")
    images, masks, labels = data
    x = pipeline.normalize(jnp.asarray(images), MEAN, STD)
    graphdef, state = nnx.split(model)
    cam = jitted_grad_cam(graphdef, state, x, None, jnp.asarray(labels), apply_model)
    assert cam.shape == (N, SIZE // 8, SIZE // 8)
    assert np.isfinite(cam).all() and float(cam.max()) > 0  # the last block's input reaches CLS


def test_foreground_fraction_by_hand():
    sal = np.zeros((2, 4, 4), np.float32)
    sal[0, 0, 0], sal[0, 3, 3] = 3.0, 1.0  # 3 inside, 1 outside
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[:, :2, :2] = 1
    frac = np.asarray(saliency.foreground_fraction(sal, mask))
    assert frac[0] == 0.75 and np.isnan(frac[1])  # an all-zero map has no fraction
    report = saliency.summarize({"m": sal}, mask)
    assert report["methods"]["m"]["foreground_fraction"] == 0.75
    assert report["methods"]["m"]["count"] == 1
    assert report["mask_area_fraction"] == 0.25


def test_unknown_architecture_is_an_error():
    class Plain(nnx.Module):
        def __call__(self, x, mask=None, *, train=False):
            return x.mean(axis=(1, 2))

    graphdef, state = nnx.split(Plain())
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="Grad-CAM needs a ConvNeXt"):
        saliency.grad_cam(graphdef, state, x, None, jnp.zeros(1, int), apply_model)
