"""The masking paper's timm augmentation, mask-aware: RandAugment, random erasing, bicubic crops
and the evaluation resize. Geometric ops move the mask with the image; the others leave it."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from bgjax.configs import cub, waterbirds
from bgjax.data import augment, pipeline, randaugment

MAGNITUDE = 9.0


def _object(height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric off-centre object: the image is non-zero exactly where the mask is 1."""
    mask = np.zeros((height, width), np.uint8)
    mask[8:30, 10:22] = 1
    mask[24:30, 10:44] = 1
    texture = np.random.default_rng(0).integers(60, 256, (height, width, 3), dtype=np.uint8)
    return texture * mask[..., None], mask


def _args(name: str, sign: float) -> tuple:
    return randaugment._level_args(name, MAGNITUDE, lambda v: sign * v)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", sorted(randaugment.GEOMETRIC_OPS))
def test_geometric_ops_move_mask_with_image(name, sign):
    image, mask = _object()
    # Nearest for the image too and fill 0: then the image's non-zero pixels must be the mask.
    out_image, out_mask = randaugment.apply_op(
        name, image, mask, _args(name, sign), interpolation="nearest", fill=(0, 0, 0)
    )
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    assert not np.array_equal(out_mask, mask), "magnitude 9 must move the object"
    np.testing.assert_array_equal(out_image.any(axis=2), out_mask.astype(bool))
    # With the recipe's bicubic the two may differ only along the silhouette.
    out_image, out_mask = randaugment.apply_op(name, image, mask, _args(name, sign), fill=(0, 0, 0))
    bright = out_image.max(axis=2) > 40
    disagree = bright != out_mask.astype(bool)
    assert disagree.sum() <= 0.25 * out_mask.sum(), f"{disagree.sum()} of {out_mask.sum()}"


@pytest.mark.parametrize(
    "name",
    sorted(set(randaugment.INCREASING_OPS + randaugment.ORIGINAL_OPS) - randaugment.GEOMETRIC_OPS),
)
def test_photometric_ops_leave_mask_untouched(name):
    image, mask = _object()
    image = np.maximum(image, 30)  # a non-trivial histogram for autocontrast/equalize
    before = mask.copy()
    out_image, out_mask = randaugment.apply_op(name, image, mask, _args(name, -1.0))
    assert out_mask is mask and np.array_equal(mask, before)
    assert out_image.shape == image.shape and out_image.dtype == np.uint8
    assert not np.array_equal(out_image, image), f"{name} at magnitude 9 changed nothing"


def test_posterize_at_the_top_magnitude_keeps_no_bits():
    """m9-mstd0.5 draws magnitude 10 at times: PosterizeIncreasing then keeps 0 bits, which
    Pillow >= 11 refuses and older Pillow (timm's reference) turned into a black image."""
    image, mask = _object()
    args = randaugment._level_args("PosterizeIncreasing", 10.0, lambda v: v)
    assert args == (0,)
    out, _ = randaugment.apply_op("PosterizeIncreasing", np.maximum(image, 30), mask, args)
    assert out.shape == image.shape and not out.any()


def _load_timm_auto_augment():
    """timm's auto_augment.py loaded on its own (it needs PIL only, not torch), or None."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "auto_augment.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_timm_auto_augment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("increasing", [True, False])
def test_matches_timm_op_list_levels_and_pixels(increasing):
    timm_aa = _load_timm_auto_augment()
    if timm_aa is None:
        pytest.skip("timm is not installed")
    policy = randaugment.parse(f"rand-m9-mstd0.5-inc{int(increasing)}")
    assert list(policy.ops) == timm_aa.rand_augment_choices("", increasing=increasing)
    image, mask = _object()
    image = np.maximum(image, 30)
    hparams = dict(translate_const=100, img_mean=randaugment.IMAGENET_FILL)
    for name in policy.ops:
        for level in (0.0, 4.3, 9.0, 10.0):
            for sign in (1.0, -1.0):
                timm_aa._randomly_negate = lambda v, s=sign: s * v  # timm's coin, fixed
                want = timm_aa.LEVEL_TO_ARG[name]
                want = () if want is None else want(level, hparams)
                got = randaugment._level_args(name, level, lambda v, s=sign: s * v)
                np.testing.assert_allclose(got, want, err_msg=f"{name} level {level}")
        args = _args(name, -1.0)
        kwargs = dict(fillcolor=randaugment.IMAGENET_FILL, resample=Image.Resampling.BICUBIC)
        want = np.asarray(timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, **kwargs))
        got, _ = randaugment.apply_op(name, image, mask, args)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_rand_augment_draws_two_ops_deterministically():
    policy = randaugment.parse("rand-m9-mstd0.5-inc1")
    assert (policy.num_layers, policy.prob, policy.increasing) == (2, 0.5, True)
    assert (policy.magnitude, policy.magnitude_std) == (9.0, 0.5)
    draws = [randaugment.sample(policy, np.random.default_rng(seed)) for seed in range(300)]
    assert all(len(d) == 2 for d in draws)
    assert draws[:5] == [randaugment.sample(policy, np.random.default_rng(s)) for s in range(5)]
    applied = [op for d in draws for op in d if op is not None]
    assert 0.4 < len(applied) / 600 < 0.6  # each op applied with probability 0.5
    assert {name for name, _ in applied} == set(randaugment.INCREASING_OPS)
    # Magnitude ~ N(9, 0.5) clipped to [0, 10]: Rotate's angle is 3 * magnitude.
    angles = np.abs([args[0] for name, args in applied if name == "Rotate"])
    assert 20 < angles.min() and angles.max() <= 30 and 26 < angles.mean() < 28
    always = randaugment.parse("rand-m9-mstd0.5-inc1-p1.0")
    assert all(d is not None for d in randaugment.sample(always, np.random.default_rng(0)))

    image, mask = _object()
    op = augment.make(dict(rand_augment="rand-m9-mstd0.5-inc1"), size=48)
    assert op is not None
    outs = [op(image, mask, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    others = [op(image, mask, np.random.default_rng(s))[0] for s in range(8)]
    assert len({o.tobytes() for o in others}) > 4


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_changes_a_box_of_the_image_only(mode):
    image, mask = _object(48, 48)
    image = np.full_like(image, 7)
    before = mask.copy()
    op = augment.make(dict(random_erasing=dict(prob=1.0, mode=mode)), size=48)
    erased, out_mask = op(image, mask, np.random.default_rng(1))
    assert out_mask is mask and np.array_equal(mask, before) and np.all(image == 7)
    rows, cols = np.nonzero((erased != 7).any(axis=2))
    box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    area = box.shape[0] * box.shape[1] / mask.size
    assert 0.02 * 0.8 < area < 1 / 3 * 1.2  # timm's area range, up to rounding
    if mode == "const":  # erased to 0 after normalisation: the mean colour
        assert np.all(box == np.rint(255 * np.array([0.485, 0.456, 0.406])))
    elif mode == "pixel":
        assert len(np.unique(box.reshape(-1, 3), axis=0)) > box.size // 6
    never = augment.make(dict(random_erasing=dict(prob=1e-9)), size=48)
    np.testing.assert_array_equal(never(image, mask, np.random.default_rng(1))[0], image)


def test_paper_recipe_keeps_mask_on_object():
    """The CUB config's augment chain (bicubic crop, flip, RandAugment, erasing)."""
    config = cub.get_config("arch=convnext,size=small")
    op = augment.make(config.augment, size=64)
    image, mask = _object(96, 128)
    image = np.where(mask[..., None] == 1, np.uint8(230), np.uint8(10)).repeat(3, axis=2)
    agree = []
    for seed in range(30):
        out_image, out_mask = op(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
        assert set(np.unique(out_mask)) <= {0, 1}
        if out_mask.sum() > 20:
            # Photometric ops may invert/solarize: compare against the better polarity.
            grey = out_image.astype(int).mean(axis=2)
            hi, lo = grey[out_mask == 1], grey[out_mask == 0]
            agree.append(abs(np.median(hi) - np.median(lo)) > 30 if lo.size else True)
    assert len(agree) > 10 and np.mean(agree) > 0.8


def test_eval_resize_crop_geometry_by_marker_pixel():
    height, width, size = 300, 400, 224
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    y, x = 100, 150  # a 10 x 10 marker, large enough to survive the downscale
    image[y : y + 10, x : x + 10] = 255
    mask[y : y + 10, x : x + 10] = 1
    out_image, out_mask = augment.eval_resize(image, mask, size, "resize_crop", 0.875, "bicubic")
    assert out_image.shape == (size, size, 3) and out_mask.shape == (size, size)
    # 300 x 400 -> 256 x 341 (shorter side 224 / 0.875) -> crop at top 16, left round(58.5) = 58.
    scale_y, scale_x = 256 / height, 341 / width
    want = ((y + 5) * scale_y - 16, (x + 5) * scale_x - 58)
    for plane in (out_image[..., 0] > 127, out_mask == 1):
        rows, cols = np.nonzero(plane)
        assert abs(rows.mean() + 0.5 - want[0]) < 0.6 and abs(cols.mean() + 0.5 - want[1]) < 0.6
    # Portrait: the longer side is the height; 518 at crop_pct 1.0 keeps the whole width.
    tall, tall_mask = augment.eval_resize(image.transpose(1, 0, 2), mask.T, 518, "resize_crop", 1.0)
    assert tall.shape == (518, 518, 3) and tall_mask.shape == (518, 518)
    warped, warped_mask = augment.eval_resize(image, mask, size)  # "warp": the whole frame
    rows, cols = np.nonzero(warped_mask)
    assert abs(rows.mean() + 0.5 - (y + 5) * size / height) < 0.6
    assert abs(cols.mean() + 0.5 - (x + 5) * size / width) < 0.6
    with pytest.raises(ValueError, match="eval_resize"):
        augment.eval_resize(image, mask, size, "squash")


class _Source:
    """Two 60 x 80 examples, a marker in the image and mask at the same place."""

    def __init__(self):
        self.items = []
        for label in range(2):
            image = np.zeros((60, 80, 3), np.uint8)
            mask = np.zeros((60, 80), np.uint8)
            image[20:30, 5 + 30 * label : 15 + 30 * label] = 200
            mask[20:30, 5 + 30 * label : 15 + 30 * label] = 1
            bbox = np.array([0, 0, 80, 60], np.int32)
            self.items.append(dict(image=image, mask=mask, bbox=bbox, label=label, habitat=-1))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_pipeline_evaluates_with_the_configured_resize():
    source = _Source()
    rule = pipeline.EvalResize.from_config(dict(eval_resize="resize_crop", interpolation="bicubic"))
    assert rule.asdict() == dict(rule="resize_crop", crop_pct=0.875, interpolation="bicubic")
    kwargs = dict(
        batch_size=2, image_size=16, train=False, seed=0, process_index=0, process_count=1
    )
    batch = next(iter(pipeline.build(source, eval_resize=rule, **kwargs)))
    for i, item in enumerate(source.items):
        image, mask = augment.eval_resize(item["image"], item["mask"], 16, **rule.asdict())
        np.testing.assert_array_equal(batch["image"][i], image)
        np.testing.assert_array_equal(batch["mask"][i], mask)
    warped = next(iter(pipeline.build(source, **kwargs)))  # default: bgjax's original warp
    first = source.items[0]
    np.testing.assert_array_equal(
        warped["mask"][0], augment.resize(first["image"], first["mask"], 16)[1]
    )
    with pytest.raises(ValueError, match="data.eval_resize"):
        pipeline.EvalResize.from_config(dict(eval_resize="centre"))


@pytest.mark.parametrize("arch", ["convnext", "vit"])
def test_paper_configs_follow_the_timm_recipe(arch):
    for config in (
        cub.get_config(f"arch={arch},size=small"),
        waterbirds.get_config(f"arch={arch}"),
    ):
        aug = config.augment
        assert tuple(aug.random_resized_crop.scale) == (0.08, 1.0)
        assert aug.random_resized_crop.interpolation == "bicubic"
        assert aug.rand_augment == "rand-m9-mstd0.5-inc1" and aug.flip
        assert aug.random_erasing.prob == 0.25 and not aug.get("color_jitter")
        rule = pipeline.EvalResize.from_config(config.data)
        want = "resize_crop" if config.data.image_size == 224 else "warp"
        assert (rule.rule, rule.interpolation) == (want, "bicubic")
        assert math.floor(224 / rule.crop_pct) == 256


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="color_jitter and augment.rand_augment"):
        augment.make(dict(color_jitter=0.4, rand_augment="rand-m9"), size=8)
    with pytest.raises(ValueError, match="unknown section"):
        randaugment.parse("rand-m9-q3")
    with pytest.raises(ValueError, match="rand_augment: unknown keys"):
        randaugment.parse(dict(policy="rand-m9", magnitude=3))
    with pytest.raises(ValueError, match="random_erasing.mode"):
        augment.make(dict(random_erasing=dict(prob=0.2, mode="noise")), size=8)
    with pytest.raises(ValueError, match="interpolation"):
        augment.make(dict(random_resized_crop=dict(interpolation="lanczos")), size=8)
