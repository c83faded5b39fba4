"""Which training examples an epoch visits: each once (natural), classes or label x habitat
groups equally often (balanced), or some examples repeated (upweighted, JTT's second stage).

    config.data.sampling = "natural" | "class_balanced" | "group_balanced"
    config.data.upweight = dict(file="", factor=1)    # JTT: a JSON list of indices, repeated
                                                      # (or errors_of: a run, `tasks.jtt`)

A balanced epoch has as many draws as the dataset has examples and gives every non-empty
stratum (class, or group g = label * num_habitats + habitat as in `bgjax.metrics`) the same
number of them (±1). Within a stratum the members come in a fresh random order, cycled as often
as needed, so a small group repeats and a large one is subsampled but no example comes twice
before every member of its stratum came once. Training on a mixed variant, whose background is
drawn after the example, balances the groups through the foreground classes (`for_variant`).
That is stratified rather than the independent weighted draws of group DRO's reweighting sampler
(Sagawa et al., ICLR 2020): the same expected frequencies, without their sampling noise. An
upweighted epoch is every example once plus the listed ones `factor - 1` more times (Liu et al.,
ICML 2021), shuffled.

`Resampled` reads the parent dataset through that per-epoch plan. The plan of epoch e comes
from (seed, e) alone, so element e * L + i is random access: the Grain iterator checkpoints its
position as for natural sampling, and a resumed run continues with the same examples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

from bgjax.variants import MIXED

SAMPLINGS = ("natural", "class_balanced", "group_balanced")
_PLAN_STREAM = 7  # keeps the plans' random stream apart from other users of the seed


def example_groups(info) -> np.ndarray:
    """int64[N] label x habitat group of every example of `info` (the label: `group_labels`
    when the dataset sets them, as the evaluation's groups); ValueError naming the dataset when
    habitats are undefined or unknown for some examples."""
    habitats = info.habitats
    if info.habitat_names is None or habitats is None or np.any(np.asarray(habitats) < 0):
        raise ValueError(
            f"dataset {info.name!r} ({info.split} split) has no label x habitat groups (its "
            "habitats are undefined or unknown): group-balanced sampling and group DRO need "
            "them; use data.sampling='class_balanced' or a dataset with habitats (synthetic, "
            "waterbirds)"
        )
    labels = info.labels if info.group_labels is None else info.group_labels
    return np.asarray(labels, np.int64) * info.num_habitats + np.asarray(habitats, np.int64)


def strata(info, sampling: str) -> np.ndarray | None:
    """The stratum of every example that `sampling` balances (None: natural)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.sampling {sampling!r}; known: {SAMPLINGS}")
    if sampling == "class_balanced":
        return np.asarray(info.labels, np.int64)
    if sampling == "group_balanced":
        return example_groups(info)
    return None


def balanced_epoch(strata: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """len(strata) indices in which every non-empty stratum appears equally often (±1; which
    strata get the extra draw is random), each stratum's members cycled in a random order,
    the whole epoch shuffled."""
    rng = _rng(seed, epoch)
    values, members_of = np.unique(strata, return_inverse=True)
    length, count = len(strata), len(values)
    draws = np.full(count, length // count)
    draws[rng.permutation(count)[: length % count]] += 1
    order = np.argsort(members_of, kind="stable")
    bounds = np.searchsorted(members_of[order], np.arange(count + 1))
    epoch = []
    for k, need in enumerate(draws):
        members = order[bounds[k] : bounds[k + 1]]
        cycles = -(-need // len(members))
        epoch.append(np.concatenate([rng.permutation(members) for _ in range(cycles)])[:need])
    return rng.permutation(np.concatenate(epoch))


def upweighted_epoch(size: int, repeated: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Every index below `size` once plus `repeated` (indices, repeats allowed), shuffled."""
    return _rng(seed, epoch).permutation(np.concatenate([np.arange(size), repeated]))


class Resampled(grain.MapDataset):
    """`parent` through per-epoch plans: element e * L + i is parent[plan(e)[i]], where
    `plan(epoch)` gives L indices (the same for the same epoch; computed once per epoch). The
    plan is pickled into Grain's worker processes: a module-level function or a partial."""

    def __init__(self, parent: grain.MapDataset, plan: Callable[[int], np.ndarray], length: int):
        super().__init__(parent)
        self._plan, self._length = plan, length
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"Resampled(length={self._length})"

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        plan = self._cache.get(epoch)
        if plan is None:
            plan = self._plan(epoch)
            self._cache = {epoch: plan}  # one assignment: safe under Grain's reader threads
        return plan

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._length)
        return self._parent[int(self._epoch_plan(epoch)[position])]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How training draws its examples (the `config.data` keys `sampling` and `upweight`).

    upweight: training example indices (e.g. JTT's error set, `bgjax.tasks.jtt`) that every
    epoch repeats `upweight_factor - 1` extra times; combined with natural sampling only."""

    mode: str = "natural"
    upweight: tuple[int, ...] = ()
    upweight_factor: int = 1

    def __post_init__(self):
        if self.mode not in SAMPLINGS:
            raise ValueError(f"data.sampling {self.mode!r}; known: {SAMPLINGS}")
        if self.upweight_factor < 1:
            raise ValueError(f"data.upweight.factor must be >= 1, got {self.upweight_factor}")
        if self.upweight and self.mode != "natural":
            raise ValueError(
                f"data.upweight with data.sampling={self.mode!r}: upweighting repeats examples "
                "of the natural epoch; use one or the other"
            )

    @classmethod
    def from_config(cls, data_config: Any) -> Sampling:
        """From `data.sampling` and `data.upweight` (its `file`: a JSON list of indices)."""
        upweight = data_config.get("upweight") or {}
        path = upweight.get("file", "")
        return cls(
            mode=data_config.get("sampling", cls.mode) or cls.mode,
            upweight=tuple(read_indices(path)) if path else (),
            upweight_factor=int(upweight.get("factor", 1)),
        )

    @property
    def natural(self) -> bool:
        return self.mode == "natural" and not (self.upweight and self.upweight_factor > 1)

    def for_variant(self, variant: Any) -> Sampling:
        """The sampling that balances the groups of images composited as `variant`. A mixed
        variant's background is drawn after the example (`variants.PartnerSampler`): for
        MIXED_RAND from a uniformly random class, independently of the foreground, and for
        MIXED_SAME / MIXED_NEXT from a class fixed by the foreground's. So balancing the
        foreground classes balances the label x background-class groups (in expectation for
        MIXED_RAND, exactly otherwise), also on datasets without habitats (IN-9)."""
        if self.mode == "group_balanced" and isinstance(variant, str) and variant in MIXED:
            return dataclasses.replace(self, mode="class_balanced")
        return self

    def apply(self, ds: grain.MapDataset, info, seed: int) -> grain.MapDataset:
        """`ds` (the source, index i = example i) resampled into one epoch (`Resampled`)."""
        if self.natural:
            raise ValueError("natural sampling is Grain's shuffle; nothing to resample")
        size = len(ds)
        if self.upweight:
            indices = np.asarray(self.upweight, np.int64)
            if indices.min() < 0 or indices.max() >= size:
                raise ValueError(
                    f"data.upweight: example indices must lie in [0, {size}) for dataset "
                    f"{info.name!r}, got [{indices.min()}, {indices.max()}]"
                )
            extra = np.repeat(indices, self.upweight_factor - 1)
            plan = functools.partial(upweighted_epoch, size, extra, seed)
            return Resampled(ds, plan, size + len(extra))
        by = strata(info, self.mode)
        if len(by) != size:
            raise ValueError(f"dataset {info.name!r}: {len(by)} labels for {size} examples")
        return Resampled(ds, functools.partial(balanced_epoch, by, seed), size)


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng((seed, _PLAN_STREAM, epoch))


def read_indices(path: str) -> np.ndarray:
    """The example indices in `path`: a JSON list (`write_indices`), or an object with the
    list under "indices" (JTT's error_set.json)."""
    try:
        indices = json.loads(epath.Path(path).read_text())
        if isinstance(indices, dict):
            indices = indices["indices"]
        indices = np.asarray(indices, np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.upweight.file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"data.upweight.file {path}: not a JSON list of integers") from error
    if indices.ndim != 1:
        raise ValueError(f"data.upweight.file {path}: expected a flat list, got {indices.shape}")
    return indices


def write_indices(path: str, indices: Sequence[int]) -> None:
    """A JSON list of example indices, as `read_indices` reads it."""
    epath.Path(path).write_text(json.dumps([int(i) for i in indices]))
