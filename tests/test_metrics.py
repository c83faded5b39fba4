"""bgjax.metrics on hand-set predictions: every number is counted by hand below."""

import numpy as np
import pytest

from bgjax import metrics


def test_accuracy_counts_only_valid_rows():
    pred = np.array([0, 1, 2, 2, 1, 0])
    label = np.array([0, 1, 1, 2, 0, 5])
    valid = np.array([1, 1, 1, 1, 0, 0], bool)  # the last two are padding
    assert metrics.accuracy(pred, label, valid) == {"accuracy": 3 / 4, "count": 4}
    assert metrics.accuracy(pred, label) == {"accuracy": 3 / 6, "count": 6}
    assert metrics.accuracy(pred[:0], label[:0]) == {"accuracy": None, "count": 0}


def test_accuracy_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="label has shape"):
        metrics.accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="valid has shape"):
        metrics.accuracy(np.zeros(3), np.zeros(3), np.ones(2, bool))


def test_bg_gap_needs_both_mixed_variants():
    assert metrics.bg_gap({"mixed_same": 0.75, "mixed_rand": 0.5}) == 0.25
    assert metrics.bg_gap({"mixed_same": 0.75, "original": 0.9}) is None
    assert metrics.bg_gap({"mixed_same": 0.75, "mixed_rand": None}) is None


# Waterbirds-like: 2 labels x 2 habitats, groups g = 2 * label + habitat.
GROUPS = ("land/l", "land/w", "water/l", "water/w")
LABEL = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
HABITAT = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
PRED = np.array([0, 0, 0, 1, 0, 1, 1, 1, 0, 1])
VALID = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
# group 0: rows 0,1 (2/2); group 1: rows 2,3 (1/2); group 2: rows 4,5 (1/2); group 3: 6,7,8 (2/3)


def test_groups_worst_group_and_weighted_average():
    groups = metrics.group_accuracies(PRED, LABEL, HABITAT, GROUPS, 2, VALID)
    assert groups == {
        "land/l": {"accuracy": 1.0, "count": 2},
        "land/w": {"accuracy": 0.5, "count": 2},
        "water/l": {"accuracy": 0.5, "count": 2},
        "water/w": {"accuracy": 2 / 3, "count": 3},
    }
    assert metrics.worst_group_accuracy(groups) == 0.5
    props = np.array([0.7, 0.05, 0.05, 0.2])
    expected = 0.7 * 1.0 + 0.05 * 0.5 + 0.05 * 0.5 + 0.2 * 2 / 3
    assert metrics.weighted_average_accuracy(groups, props) == pytest.approx(expected, abs=1e-12)


def test_empty_group_is_skipped_and_weights_renormalised():
    keep = VALID & (LABEL * 2 + HABITAT != 1)  # drop group land/w entirely
    groups = metrics.group_accuracies(PRED, LABEL, HABITAT, GROUPS, 2, keep)
    assert groups["land/w"] == {"accuracy": None, "count": 0}
    assert metrics.worst_group_accuracy(groups) == 0.5
    props = np.array([0.7, 0.05, 0.05, 0.2])
    expected = (0.7 * 1.0 + 0.05 * 0.5 + 0.2 * 2 / 3) / 0.95
    assert metrics.weighted_average_accuracy(groups, props) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="train_group_proportions"):
        metrics.weighted_average_accuracy(groups, props[:3])


def test_imagenet_to_in9_table_matches_the_reference_ranges():
    table = metrics.IMAGENET_TO_IN9
    assert table.shape == (1000,) and int((table >= 0).sum()) == 370
    dog, bird, vehicle, reptile, carn, insect, music, primate, fish = range(9)
    spot = {
        151: dog, 170: dog, 171: -1, 172: -1, 173: dog, 268: dog,
        7: bird, 24: bird, 25: -1, 87: bird, 100: bird, 127: bird, 146: bird,
        407: vehicle, 880: vehicle, 409: -1,
        33: reptile, 68: reptile, 69: -1,
        269: carn, 280: carn, 281: -1, 285: -1, 286: carn, 299: carn, 356: carn, 388: carn,
        300: insect, 326: insect,
        401: music, 889: music, 890: -1,
        365: primate, 384: primate, 385: -1,
        0: fish, 6: fish, 389: fish, 397: fish, 398: -1, 999: -1,
    }  # fmt: skip
    for index, want in spot.items():
        assert table[index] == want, index
    per_class = [int((table == c).sum()) for c in range(9)]
    assert per_class == [116, 52, 42, 36, 35, 27, 26, 20, 16]


def test_imagenet_predictions_score_unmapped_as_wrong():
    top1 = np.array([151, 171, 7, 999, 0, 880])  # dog, unmapped, bird, unmapped, fish, vehicle
    label = np.array([0, 0, 1, 8, 8, 2])
    mapped = metrics.map_imagenet_to_in9(top1)
    np.testing.assert_array_equal(mapped, [0, -1, 1, -1, 8, 2])
    assert metrics.accuracy(mapped, label) == {"accuracy": 4 / 6, "count": 6}
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        metrics.map_imagenet_to_in9(np.array([1000]))


def test_four_buckets():
    #                 0  1  2  3  4  5  6  7 (pad)
    orig = np.array([1, 1, 0, 1, 0, 1, 0, 1], bool)
    fg = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    bg = np.array([1, 0, 0, 1, 1, 0, 0, 1], bool)
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
    table = metrics.four_buckets(orig, fg, bg, valid)
    assert table == {
        "fg_correct_bg_correct": {"count": 1, "fraction": 1 / 7, "original_accuracy": 1.0},
        "fg_correct_bg_wrong": {"count": 2, "fraction": 2 / 7, "original_accuracy": 0.5},
        "fg_wrong_bg_correct": {"count": 2, "fraction": 2 / 7, "original_accuracy": 0.5},
        "fg_wrong_bg_wrong": {"count": 2, "fraction": 2 / 7, "original_accuracy": 0.5},
    }
    assert sum(v["count"] for v in table.values()) == valid.sum()


def test_per_class_accuracies():
    out = metrics.per_class_accuracies(PRED, LABEL, ("land", "water", "none"), VALID)
    assert out == {
        "land": {"accuracy": 3 / 4, "count": 4},
        "water": {"accuracy": 3 / 5, "count": 5},
        "none": {"accuracy": None, "count": 0},
    }
