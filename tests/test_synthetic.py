"""The procedural synthetic dataset: determinism, exact masks, group structure, config errors."""

import pickle

import grain
import ml_collections
import numpy as np
import pytest

from bgjax import data
from bgjax.data import synthetic, synthetic_render

SMALL = dict(image_size=32, train_size=450, val_size=162, test_size=162)


def _source(split="train", **overrides):
    return synthetic.make_source({**SMALL, **overrides}, split)


@pytest.fixture(scope="module")
def train():
    return _source("train")


def _assert_same_example(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_registered_and_reads_config_dicts():
    config = ml_collections.ConfigDict(dict(name="synthetic", **SMALL))
    source = data.get_source(config, "val")
    assert len(source) == 162 and source.info.split == "val"
    assert source.info.class_names == synthetic_render.SHAPES
    assert source.info.habitat_names == synthetic_render.HABITATS
    assert len(synthetic.make_source({}, "train")) == 9000  # 1000 per class by default


def test_deterministic_and_seeded(train):
    again = _source("train")
    for i in (0, 7, 449):
        _assert_same_example(train[i], again[i])
    other_seed = _source("train", seed=1)
    assert not np.array_equal(train[0]["image"], other_seed[0]["image"])
    # Splits draw from separate streams.
    assert not np.array_equal(train[0]["image"], _source("val")[0]["image"])


def test_random_access_in_any_order(train):
    order = np.random.default_rng(0).permutation(40)
    shuffled = {int(i): train[int(i)] for i in order}
    for i in range(40):
        _assert_same_example(train[i], shuffled[i])
    _assert_same_example(train[-1], train[len(train) - 1])
    _assert_same_example(train[np.int64(3)], train[3])
    with pytest.raises(IndexError):
        train[len(train)]


def test_rendered_once_cached_exactly_and_not_pickled(monkeypatch):
    source, calls = _source("val"), []
    render = synthetic_render.render
    monkeypatch.setattr(synthetic_render, "render", lambda *a: calls.append(1) or render(*a))
    first = source[3]
    first["image"][:] = 0  # the caller's copy: the cache must not change
    again = source[3]
    assert len(calls) == 1
    _assert_same_example(again, _source("val")[3])  # = a fresh render, bit for bit
    assert len(pickle.dumps(source)) < 20_000  # workers get the recipe, not the pixels
    monkeypatch.setattr(synthetic, "CACHE_BYTES", 0)
    uncached = _source("val")
    uncached[3], uncached[3]
    assert len(calls) == 4  # the cached call + the fresh render above + 2 uncached renders


def test_works_through_grain_and_pickle(train):
    dataset = grain.MapDataset.source(train)
    _assert_same_example(dataset[5], train[5])
    _assert_same_example(pickle.loads(pickle.dumps(train))[5], train[5])


@pytest.mark.parametrize("size", [16, 64, 224])
def test_example_shapes_dtypes_and_exact_masks(size):
    source = _source("train", image_size=size)
    for i in range(4 if size == 224 else 40):
        ex = source[i]
        assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
        assert ex["mask"].shape == (size, size) and ex["mask"].dtype == np.uint8
        assert set(np.unique(ex["mask"])) == {0, 1}
        assert ex["bbox"].dtype == np.int32 and ex["label"].dtype == np.int32
        assert ex["label"].shape == ex["habitat"].shape == ()
        assert 0 <= ex["label"] < 9 and 0 <= ex["habitat"] < 9
        # bbox is the mask's tight box, end-exclusive, and leaves margins for ONLY_BG_T.
        rows, cols = np.nonzero(ex["mask"])
        x0, y0, x1, y1 = ex["bbox"]
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert x0 > 0 and y0 > 0 and x1 < size and y1 < size
        assert max(x1 - x0, y1 - y0) <= 0.9 * size


def test_mask_is_the_object_and_nothing_else():
    # Same generator state, another habitat: the object (its pixels and silhouette) is unchanged
    # and every background pixel changes; another label changes nothing outside both silhouettes.
    def draw(label, habitat):
        return synthetic_render.render(label, habitat, 48, np.random.default_rng(11))

    a, other_habitat, other_label = draw(2, 3), draw(2, 5), draw(6, 3)
    inside = a["mask"].astype(bool)
    np.testing.assert_array_equal(a["mask"], other_habitat["mask"])
    np.testing.assert_array_equal(a["image"][inside], other_habitat["image"][inside])
    assert (a["image"][~inside] != other_habitat["image"][~inside]).any(axis=-1).mean() > 0.5
    outside_both = ~inside & ~other_label["mask"].astype(bool)
    np.testing.assert_array_equal(a["image"][outside_both], other_label["image"][outside_both])
    assert not np.array_equal(a["mask"], other_label["mask"])


def test_all_shapes_are_distinct_silhouettes():
    # Same pose for every class: the silhouettes must differ pairwise (IoU well below 1).
    masks = [
        synthetic_render.render(c, 0, 64, np.random.default_rng(0))["mask"].astype(bool)
        for c in range(synthetic.MAX_CLASSES)
    ]
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.8, (synthetic_render.SHAPES[i], synthetic_render.SHAPES[j], iou)


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 1.0])
def test_train_labels_balanced_and_habitats_correlated(correlation):
    info = synthetic.make_source({"bg_correlation": correlation, "train_size": 901}, "train").info
    counts = np.bincount(info.labels, minlength=9)
    assert counts.max() - counts.min() <= 1
    aligned = info.labels == info.habitats
    assert abs(aligned.mean() - correlation) <= 0.01
    # Misaligned examples spread evenly over the other habitats.
    off = info.habitats[(info.labels == 0) & ~aligned]
    if len(off) >= 16:
        assert np.bincount(off, minlength=9)[0] == 0 and np.ptp(np.bincount(off)[1:]) <= 1
    proportions = info.train_group_proportions.reshape(9, 9)
    np.testing.assert_allclose(proportions.sum(), 1.0)
    np.testing.assert_allclose(np.trace(proportions), aligned.mean())
    # Every prefix is a random sample, not a block of aligned examples.
    assert abs(aligned[:300].mean() - correlation) <= 0.1


def test_evaluation_splits_follow_test_distribution():
    balanced = _source("test").info
    groups = np.bincount(balanced.labels * 9 + balanced.habitats, minlength=81)
    assert groups.min() == groups.max() == 2  # 162 examples over 81 groups, exactly uniform
    for split, config in (("test_iid", {}), ("val", {"test_distribution": "iid"})):
        info = _source(split, **config).info
        assert abs((info.labels == info.habitats).mean() - 0.9) <= 0.03  # rounding per class
    assert (_source("test_balanced").info.labels == balanced.labels).all()
    assert _source("val").info.split == "val"


def test_info_agrees_with_examples(train):
    for i in range(0, len(train), 37):
        ex = train[i]
        assert ex["label"] == train.info.labels[i] and ex["habitat"] == train.info.habitats[i]
    assert train.info.labels.dtype == train.info.habitats.dtype == np.int32
    assert train.info.image_size == 32 and len(train.info.mean) == len(train.info.std) == 3


def test_object_colour_carries_no_label_information():
    # Mean object colour per class (and per habitat) agree within sampling noise; so does the
    # background colour per class on the balanced split, where habitats are independent of labels.
    source = _source("test_balanced", image_size=24, test_size=810)
    fg, bg, labels, habitats = [], [], source.info.labels, source.info.habitats
    for i in range(len(source)):
        ex = source[i]
        inside = ex["mask"].astype(bool)
        fg.append(ex["image"][inside].mean(0))
        bg.append(ex["image"][~inside].mean(0))
    for colours, groups in ((fg, labels), (fg, habitats), (bg, labels)):
        colours = np.array(colours)
        means = np.stack([colours[groups == c].mean(0) for c in range(9)])
        stderr = colours.std(0) / np.sqrt(len(colours) / 9)
        assert (np.abs(means - colours.mean(0)) < 4 * stderr).all(), means


def test_two_classes_mirror_waterbirds():
    source = synthetic.make_source({"num_classes": 2, "bg_correlation": 0.95}, "train")
    info = source.info
    assert info.class_names == synthetic_render.SHAPES[:2] and info.num_habitats == 2
    assert len(source) == 2000 and set(np.unique(info.labels)) == {0, 1}
    np.testing.assert_allclose(info.train_group_proportions, [0.475, 0.025, 0.025, 0.475])
    assert source[3]["label"] in (0, 1)


@pytest.mark.parametrize(
    "config, split, key",
    [
        ({"num_classes": 10}, "train", "num_classes"),
        ({"num_classes": 1}, "train", "num_classes"),
        ({"image_size": 8}, "train", "image_size"),
        ({"image_size": 64.0}, "train", "image_size"),
        ({"bg_correlation": 1.5}, "train", "bg_correlation"),
        ({"bg_correlation": -0.1}, "train", "bg_correlation"),
        ({"train_size": 0}, "train", "train_size"),
        ({"seed": -1}, "train", "seed"),
        ({"test_distribution": "skewed"}, "test", "test_distribution"),
        ({}, "validation", "split"),
    ],
)
def test_bad_config_names_the_key(config, split, key):
    with pytest.raises(ValueError, match=key):
        synthetic.make_source(config, split)
