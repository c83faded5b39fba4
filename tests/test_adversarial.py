"""Adversarial-background search on constructed cases with a known vulnerable subset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bgjax import parallel
from bgjax.analysis import adversarial

NUM_FG, NUM_BG, CLASSES = 30, 25, 3
LABELS = np.arange(NUM_FG) % CLASSES
# foreground -> the backgrounds that flip it; everything else is robust.
FLIPS = {
    1: {3},
    4: {0, 24},
    7: set(range(NUM_BG)),  # every background flips it (like a misclassified foreground)
    12: {10, 11, 12},
    20: {24},
    29: {5, 17},
}


def table_predict(calls=None):
    def predict(fg, bg):
        if calls is not None:
            calls.append(len(fg))
        flipped = np.array([b in FLIPS.get(int(f), ()) for f, b in zip(fg, bg)])
        return np.where(flipped, (LABELS[fg] + 1) % CLASSES, LABELS[fg])

    return predict


def first_flip(f, order):
    hits = [i for i, b in enumerate(order) if b in FLIPS.get(f, ())]
    return hits[0] if hits else None


@pytest.mark.parametrize("max_backgrounds", [None, 12])
@pytest.mark.parametrize("batch_size", [1, 4, 16, 64])
def test_batched_search_finds_exactly_the_vulnerable_subset(batch_size, max_backgrounds):
    order = adversarial.background_order(NUM_BG, seed=3, max_backgrounds=max_backgrounds)
    k = order.size
    calls = []
    result = adversarial.batched_search(table_predict(calls), LABELS, order, batch_size=batch_size)
    expected = {f for f in FLIPS if first_flip(f, order) is not None}
    assert set(np.flatnonzero(result.vulnerable)) == expected
    if max_backgrounds is not None:
        assert expected != set(FLIPS)  # the cut at K really leaves some flips unreached
    for f in range(NUM_FG):
        first = first_flip(f, order)
        assert result.flip_background[f] == (-1 if first is None else order[first])
    assert result.flip_prediction[4] in (-1, (LABELS[4] + 1) % CLASSES)
    assert all(c == batch_size for c in calls)  # static shapes: one compile for a jitted predict
    # early exit: far fewer composites than trying every background for every foreground
    assert result.forward_passes < NUM_FG * k
    assert result.forward_passes == result.tried.sum()
    # ... and the serial reference loop finds the very same backgrounds
    serial = adversarial.serial_search(table_predict(), LABELS, order)
    np.testing.assert_array_equal(serial.vulnerable, result.vulnerable)
    np.testing.assert_array_equal(serial.flip_background, result.flip_background)
    firsts = [first_flip(f, order) for f in range(NUM_FG)]
    exact = sum(k if first is None else first + 1 for first in firsts)
    assert serial.forward_passes == exact < NUM_FG * k


def test_serial_search_in_reference_sized_batches():
    order = adversarial.background_order(NUM_BG, seed=0)
    serial = adversarial.serial_search(table_predict(), LABELS, order, per_pass=8)
    assert set(np.flatnonzero(serial.vulnerable)) == set(FLIPS)
    # whole passes of 8 (the last of the pool has 1): robust foregrounds try all 25
    assert serial.tried[0] == NUM_BG
    assert all(t % 8 == 0 or t == NUM_BG for t in serial.tried)


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError, match="pool is empty"):
        adversarial.batched_search(table_predict(), LABELS, np.zeros(0, np.int32), batch_size=4)


# ------------------------------------------------------------------------------ on device

SIZE = 8


class TriggerModel(nnx.Module):
    """Predicts the foreground's code (centre, channel 0), shifted by one for a *weak*
    foreground (centre channel 1 set) on a *trigger* background (corner channel 2 set)."""

    def __init__(self):
        self.num_classes = CLASSES
        self.masking = "none"

    def __call__(self, x, mask=None, *, train=False):
        v = x * 255.0  # mean 0, std 1
        code = jnp.round((v[:, 4, 4, 0] - 20.0) / 20.0).astype(jnp.int32)
        weak, trigger = v[:, 4, 4, 1] > 127, v[:, 0, 0, 2] > 127
        return jax.nn.one_hot(jnp.where(weak & trigger, (code + 1) % CLASSES, code), CLASSES)


def trigger_case():
    rng = np.random.default_rng(0)
    n, m = 14, 11
    labels = np.arange(n) % CLASSES
    codes = labels.copy()
    codes[[2, 9]] = (labels[[2, 9]] + 1) % CLASSES  # misclassified on any background
    weak = np.zeros(n, bool)
    weak[[0, 5, 6, 11]] = True
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, 2:6, 2:6, 0] = (20 + 20 * codes)[:, None, None]
    images[:, 2:6, 2:6, 1] = np.where(weak, 255, 0)[:, None, None]
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    masks[:, 2:6, 2:6] = 1
    backgrounds = rng.integers(0, 256, (m, SIZE, SIZE, 3), dtype=np.uint8)
    trigger = np.zeros(m, bool)
    trigger[[4, 7]] = True
    backgrounds[:, 0, 0, 2] = np.where(trigger, 255, 0)
    return labels, images, masks, backgrounds, weak | (codes != labels), trigger


def test_device_search_matches_the_constructed_subset():
    assert jax.device_count() == 4
    mesh = parallel.make_mesh([("data", -1)])
    labels, images, masks, backgrounds, vulnerable, trigger = trigger_case()
    predict = adversarial.composite_predictor(
        TriggerModel(), mesh, images, masks, backgrounds, mean=(0, 0, 0), std=(1, 1, 1)
    )
    order = adversarial.background_order(backgrounds.shape[0], seed=1)
    result = adversarial.batched_search(predict, labels, order, batch_size=8)
    np.testing.assert_array_equal(result.vulnerable, vulnerable)
    first_trigger = order[np.flatnonzero(trigger[order])[0]]
    for f in np.flatnonzero(vulnerable):
        weak_only = images[f, 4, 4, 0] == 20 + 20 * labels[f]
        assert result.flip_background[f] == (first_trigger if weak_only else order[0])
    assert result.forward_passes < labels.size * order.size
    serial = adversarial.serial_search(predict, labels, order)  # batches of 1: replicated
    np.testing.assert_array_equal(serial.flip_background, result.flip_background)

    original = parallel.fetch(predict(np.arange(14), np.zeros(14, int)))  # bg 0: no trigger
    report = adversarial.summarize(result, labels, original, ("a", "b", "c"))
    assert report["vulnerable"] == vulnerable.sum()
    assert report["challenge_accuracy"] == 1 - vulnerable.mean()
    assert report["per_class"]["a"] == {
        "vulnerable_fraction": vulnerable[labels == 0].mean(),
        "count": int((labels == 0).sum()),
    }
    assert report["misclassified_on_original"] == 2  # foregrounds 2 and 9


def test_examples_figure(tmp_path):
    labels, images, masks, backgrounds, vulnerable, _ = trigger_case()
    result = adversarial.SearchResult(
        vulnerable=vulnerable,
        flip_background=np.where(vulnerable, 4, -1).astype(np.int32),
        flip_prediction=np.where(vulnerable, 1, -1).astype(np.int32),
        tried=np.ones(labels.size, np.int32),
        forward_passes=labels.size,
        padded_passes=0,
        max_backgrounds=backgrounds.shape[0],
    )
    rows = dict(image=images, mask=masks, label=labels)
    path = adversarial.examples_figure(
        result, rows, backgrounds, ("a", "b", "c"), tmp_path / "x.png"
    )
    assert path and (tmp_path / "x.png").stat().st_size > 1000
