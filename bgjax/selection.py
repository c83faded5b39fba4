"""Hyperparameter selection over a sweep's runs: per method, the setting with the best validation
metric (mean over seeds), then its test metrics as mean ± std over seeds. `bgjax aggregate`
applies it when the sweep has a `selection` key and writes selection.json + a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from bgjax import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Selection:
    """The sweep's `selection` key: per method, the hyperparameters with the best `metric`
    (mean over seeds), then the `report` metrics of that setting as mean ± sample std over its
    seeds (the protocol of Idrissi et al., CLeaR 2022, "BalancingGroups").

    Metrics are "<eval name>:<metric>", a metric as in aggregate.md's columns (a variant's
    accuracy, bg_gap, worst_group_accuracy, average_accuracy). A run's method is its points on
    `method_axes` (joined by "-"); its setting, its points on every other axis but `seed_axis`.
    Runs are compared at their last checkpoint."""

    metric: str = "val:worst_group_accuracy"
    mode: str = "max"
    method_axes: tuple[str, ...] = ("method",)
    seed_axis: str = "seed"
    report: tuple[str, ...] = (
        "test:average_accuracy",
        "test:worst_group_accuracy",
        "test:bg_gap",
    )

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Selection:
        spec = dict(spec.items())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(spec) - fields
        if unknown:
            raise ValueError(f"sweep selection: unknown keys {sorted(unknown)}; known: "
                             f"{sorted(fields)}")  # fmt: skip
        spec = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.items()}
        selection = cls(**spec)
        if selection.mode not in ("max", "min"):
            raise ValueError(f"sweep selection.mode must be max or min, got {selection.mode!r}")
        for name in (selection.metric, *selection.report):
            _split_metric(name)
        return selection

    @classmethod
    def from_manifest(cls, root: str | os.PathLike) -> Selection | None:
        """The sweep's selection (ROOT/sweep.json), or None when it has none."""
        manifest = epath.Path(root) / "sweep.json"
        if not manifest.exists():
            return None
        spec = json.loads(manifest.read_text())["sweep"].get("selection")
        return None if spec is None else cls.parse(spec)


def _split_metric(name: str) -> tuple[str, str]:
    evaluation, sep, metric = name.partition(":")
    if not sep or not evaluation or not metric:
        raise ValueError(f"sweep selection metric {name!r} is not of the form <eval>:<metric>")
    return evaluation, metric


def _metric(row: Mapping[str, Any], name: str) -> float | None:
    evaluation, metric = _split_metric(name)
    return row["metrics"].get(evaluation, {}).get(metric)


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return dict(mean=float(values.mean()), std=std, n=len(values))


def select(rows: Sequence[Mapping[str, Any]], selection: Selection) -> list[dict[str, Any]]:
    """One entry per method (in the rows' order): the chosen setting, its selection value and
    its report metrics over seeds; ties go to the setting of the first row (`collect` orders
    rows as the sweep's grid)."""
    settings: dict[str, dict[tuple, list]] = {}
    for row in rows:
        points = row.get("points") or {}
        method = "-".join(points[a] for a in selection.method_axes if a in points) or "all"
        method = f"dfr+{method}" if row.get("dfr_of") else method
        ignored = (*selection.method_axes, selection.seed_axis)
        setting = tuple((a, p) for a, p in points.items() if a not in ignored)
        settings.setdefault(method, {}).setdefault(setting, []).append(row)
    sign = 1.0 if selection.mode == "max" else -1.0
    chosen = []
    for method, candidates in settings.items():
        scored = []
        for setting, runs in candidates.items():
            values = [v for v in (_metric(r, selection.metric) for r in runs) if v is not None]
            if values:
                scored.append((sign * float(np.mean(values)), setting, runs))
        if not scored:
            logging.warning("selection: no run of %s has %s", method, selection.metric)
            continue
        best = max(scored, key=lambda item: item[0])  # max keeps the first of equal items
        _, setting, runs = best
        report = {}
        for name in selection.report:
            values = [v for v in (_metric(r, name) for r in runs) if v is not None]
            report[name] = _mean_std(values) if values else None
        chosen.append(
            dict(
                method=method,
                setting=dict(setting),
                selected_by=selection.metric,
                selection_value=sign * best[0],
                settings_compared=len(scored),
                seeds=[r.get("seed") for r in runs],
                runs=[r["run"] for r in runs],
                report=report,
            )
        )
    return chosen


def selection_markdown(chosen: Sequence[Mapping[str, Any]], selection: Selection) -> str:
    """The methods table: chosen setting, selection value, report metrics as mean ± std (%)."""
    pct = metrics_lib.pct
    head = ["method", "chosen", "seeds", f"{selection.metric} ({selection.mode})"]
    head += list(selection.report)
    parts = [
        f"## Methods: hyperparameters chosen by {selection.metric}, mean ± std over seeds (%)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---:|" + "---:|" * (1 + len(selection.report)),
    ]
    for entry in chosen:
        setting = ", ".join(entry["setting"].values()) or "—"
        cells = [entry["method"], setting, str(len(entry["seeds"])), pct(entry["selection_value"])]
        for name in selection.report:
            stats = entry["report"][name]
            cells.append("—" if stats is None else f"{pct(stats['mean'])} ± {pct(stats['std'])}")
        parts.append("| " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"
