"""Metrics of the background-bias papers, as pure NumPy functions of per-image predictions.

Everything takes flat arrays (one entry per evaluated image) plus an optional `valid` mask, so
padding rows of the last eval batch are never counted. Accuracies are fractions in [0, 1]; a
subset with no image has accuracy None (JSON null), never NaN.

    accuracy(pred, label, valid)            -> {"accuracy", "count"}
    bg_gap(accuracies)                      -> acc(mixed_same) - acc(mixed_rand)
    group_accuracies(...)                   -> per label x habitat group
    worst_group_accuracy / weighted_average_accuracy
    map_imagenet_to_in9(pred_1000)          -> IN-9 label, -1 for the 630 unmapped classes
    four_buckets(original, fg, bg)          -> the fg/bg correctness table
    background_class_share(pred, bg_label)  -> how often a mixed image gets its background's class

Definitions: docs/reference.md#in9-metrics (BG-gap, buckets), #in9-class-mapping, #waterbirds
(groups, worst-group and weighted average accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bgjax.data import in9

IN9_CLASSES = in9.CLASS_NAMES

UNMAPPED = -1

# IMAGENET_TO_IN9[i] = IN-9 label of ImageNet class i, or -1 (a top-1 there counts as wrong).
# The table is a fact about the dataset, so it lives with the IN-9 reader.
IMAGENET_TO_IN9: np.ndarray = in9.imagenet_to_in9()
IMAGENET_TO_IN9.setflags(write=False)


def map_imagenet_to_in9(pred_1000) -> np.ndarray:
    """IN-9 label of each ImageNet-1k top-1 index; -1 where the class is unmapped."""
    pred = np.asarray(pred_1000)
    if pred.size and (pred.min() < 0 or pred.max() >= IMAGENET_TO_IN9.size):
        raise ValueError(
            f"ImageNet predictions must lie in [0, 1000), got [{pred.min()}, {pred.max()}]"
        )
    return IMAGENET_TO_IN9[pred]


def _valid(valid, n: int) -> np.ndarray:
    if valid is None:
        return np.ones(n, bool)
    valid = np.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"valid has shape {valid.shape}, expected ({n},)")
    return valid


def _flat(name: str, a, n: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = "(N,)" if n is None else f"({n},)"
        raise ValueError(f"{name} has shape {a.shape}, expected {want}")
    return a


def correct(pred, label, valid=None) -> np.ndarray:
    """bool[N]: prediction equals label, False on invalid rows."""
    pred = _flat("pred", pred)
    label = _flat("label", label, pred.shape[0])
    return (pred == label) & _valid(valid, pred.shape[0])


def accuracy(pred, label, valid=None) -> dict:
    """{"accuracy": fraction correct over valid rows (None if none), "count": valid rows}."""
    hits = correct(pred, label, valid)
    count = int(_valid(valid, hits.shape[0]).sum())
    return {"accuracy": _fraction(int(hits.sum()), count), "count": count}


def _fraction(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def bg_gap(accuracies: Mapping[str, float | None]) -> float | None:
    """acc(mixed_same) - acc(mixed_rand), or None unless both were evaluated."""
    same, rand = accuracies.get("mixed_same"), accuracies.get("mixed_rand")
    return None if same is None or rand is None else same - rand


def group_ids(label, habitat, num_habitats: int) -> np.ndarray:
    """Group g = label * num_habitats + habitat; -1 where the habitat is unknown (-1)."""
    label, habitat = np.asarray(label), np.asarray(habitat)
    return np.where(habitat >= 0, label * num_habitats + habitat, -1)


def group_accuracies(
    pred, label, habitat, group_names: Sequence[str], num_habitats: int, valid=None,
    group_label=None,
) -> dict[str, dict]:  # fmt: skip
    """Accuracy and count of every label x habitat group, keyed by `group_names[g]`.

    Groups without images are reported with count 0 and accuracy None. `group_label`: group
    by this label instead of the predicted one (e.g. waterbird/landbird for species labels).
    """
    hits = correct(pred, label, valid)
    n = hits.shape[0]
    by = label if group_label is None else group_label
    groups = group_ids(_flat("group label", by, n), _flat("habitat", habitat, n), num_habitats)
    keep = _valid(valid, n)
    if np.any(groups[keep] >= len(group_names)):
        raise ValueError(f"group id {groups[keep].max()} >= {len(group_names)} group names")
    return _accuracy_by(hits, groups, group_names, keep)


def worst_group_accuracy(groups: Mapping[str, Mapping]) -> float | None:
    """Minimum accuracy over groups that have images."""
    accs = [g["accuracy"] for g in groups.values() if g["count"] > 0]
    return min(accs) if accs else None


def weighted_average_accuracy(groups: Mapping[str, Mapping], proportions) -> float | None:
    """Group accuracies weighted by training group proportions (Waterbirds' "average" accuracy).

    `proportions[g]` goes with the g-th group of `groups` (insertion order = group id). Groups
    absent from the evaluated split are left out and the remaining weights renormalised.
    """
    proportions = np.asarray(proportions, np.float64)
    if proportions.shape != (len(groups),):
        raise ValueError(
            f"train_group_proportions has shape {proportions.shape}, expected ({len(groups)},)"
        )
    total = weight = 0.0
    for p, g in zip(proportions, groups.values()):
        if g["count"] > 0:
            total += p * g["accuracy"]
            weight += p
    return None if weight == 0 else total / weight


def per_class_accuracies(pred, label, class_names: Sequence[str], valid=None) -> dict[str, dict]:
    """Accuracy and count per true class."""
    hits = correct(pred, label, valid)
    return _accuracy_by(hits, np.asarray(label), class_names, _valid(valid, hits.shape[0]))


def _accuracy_by(hits, keys, names: Sequence[str], keep) -> dict[str, dict]:
    """{names[i]: accuracy and count of the kept rows whose key is i}."""
    out = {}
    for i, name in enumerate(names):
        rows = keep & (keys == i)
        count = int(rows.sum())
        out[name] = {"accuracy": _fraction(int(hits[rows].sum()), count), "count": count}
    return out


BUCKETS = (
    "fg_correct_bg_correct",
    "fg_correct_bg_wrong",
    "fg_wrong_bg_correct",
    "fg_wrong_bg_wrong",
)


def four_buckets(original_correct, fg_correct, bg_correct, valid=None) -> dict[str, dict]:
    """The fg/bg table of "Noise or Signal": each image is put in one of four buckets by whether
    it is classified correctly from its foreground alone (its MIXED_RAND prediction) and from its
    background alone (its ONLY_BG_T prediction); per bucket: image count, share of all images,
    and accuracy on ORIGINAL. The three arrays must be aligned by image index.
    """
    orig = _flat("original_correct", original_correct).astype(bool)
    n = orig.shape[0]
    fg = _flat("fg_correct", fg_correct, n).astype(bool)
    bg = _flat("bg_correct", bg_correct, n).astype(bool)
    keep = _valid(valid, n)
    total = int(keep.sum())
    out = {}
    for name, (want_fg, want_bg) in zip(BUCKETS, ((1, 1), (1, 0), (0, 1), (0, 0))):
        rows = keep & (fg == bool(want_fg)) & (bg == bool(want_bg))
        count = int(rows.sum())
        out[name] = {
            "count": count,
            "fraction": _fraction(count, total),
            "original_accuracy": _fraction(int(orig[rows].sum()), count),
        }
    return out


def background_class_share(pred, bg_label) -> dict:
    """{"share": fraction of images whose prediction is their background's class, "count":
    images whose background class is known (bg_label >= 0)}. On MIXED_RAND / MIXED_NEXT, where
    the background comes from another class, this measures predictions driven by the
    background rather than the foreground."""
    pred = _flat("pred", pred)
    bg_label = _flat("bg_label", bg_label, pred.shape[0])
    known = bg_label >= 0
    count = int(known.sum())
    return {"share": _fraction(int((pred[known] == bg_label[known]).sum()), count), "count": count}


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage for tables ("—" when undefined)."""
    return "—" if x is None else f"{100 * x:.{digits}f}"
