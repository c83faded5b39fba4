"""Per-example evaluation records: one row per example and variant, next to results.json.

Columns: variant, index (the example's row in the source), file (its image file, when the
source has files), label, pred (-1: an unmapped ImageNet class), prob_label (the model's
probability of the true class), and for mixed variants bg_file / bg_label: the image whose
background was pasted and its class (-1 / empty where unknown, e.g. the IN-9 release's
mixed_rand, whose file names do not name the background). Parquet when pyarrow is installed,
else CSV. Also where each variant's rows come from (`variant_input`) and the check that row i
of every variant is the same foreground (`check_aligned`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

COLUMNS = ("variant", "index", "file", "label", "pred", "prob_label", "bg_file", "bg_label")


def variant_input(source, name: str):
    """(source, pipeline variant) that gives variant `name` of `source`."""
    pick = getattr(source, "variant_input", None)
    return pick(name) if pick is not None else (source, name)


def check_aligned(sources: Mapping[str, Any]) -> None:
    """ValueError unless row i of every variant's source shows the same foreground (sources
    that say which: `foreground_ids`), as the bucket table compares rows across variants."""
    ids = {k: getattr(s, "foreground_ids", None) for k, s in sources.items()}
    ids = {k: v for k, v in ids.items() if v is not None}
    if len({tuple(v) for v in ids.values()}) > 1:
        first, *rest = ids
        bad = next(k for k in rest if ids[k] != ids[first])
        diff = sorted(set(ids[first]) ^ set(ids[bad]))[:3]
        raise ValueError(
            f"released variants {first!r} ({len(ids[first])} images) and {bad!r} "
            f"({len(ids[bad])}) hold different foregrounds, e.g. {diff}: every released variant "
            "folder must hold one image per original"
        )


def _file(source, index: int) -> str:
    image_file = getattr(source, "image_file", None)
    return "" if image_file is None or index < 0 else str(image_file(int(index)))


def backgrounds(source, predictions: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """bg_label (int32, -1 unknown) and bg_file of each row: from the pipeline's donor index
    (regenerated mixed variants) or from the source (`background(i)`: a released mixed file)."""
    n = len(predictions["label"])
    donor = np.asarray(predictions.get("bg_index", np.full(n, -1)), np.int64)
    labels = np.asarray(source.info.labels)
    bg_label = np.where(donor >= 0, labels[np.clip(donor, 0, None)], -1).astype(np.int32)
    bg_file = [_file(source, i) for i in donor]
    released = getattr(source, "background", None)
    if released is not None and not (donor >= 0).any():
        for i in range(n):
            path, label = released(i)
            bg_file[i], bg_label[i] = path or "", label
    return dict(bg_label=bg_label, bg_file=bg_file)


def columns(predictions: Mapping[str, Mapping[str, Any]], sources: Mapping[str, Any]):
    """The rows of every variant as {column: list}, variants in evaluation order."""
    out: dict[str, list] = {k: [] for k in COLUMNS}
    for name, p in predictions.items():
        n = len(p["label"])
        out["variant"] += [name] * n
        out["index"] += list(range(n))
        out["file"] += [_file(sources[name], i) for i in range(n)]
        for key, cast in (("label", int), ("pred", int), ("prob_label", float)):
            out[key] += [cast(v) for v in (p["prob"] if key == "prob_label" else p[key])]
        out["bg_file"] += list(p["bg_file"])
        out["bg_label"] += [int(v) for v in p["bg_label"]]
    return out


def write(columns: Mapping[str, list], out_dir: str | os.PathLike) -> str:
    """`records.parquet` (pyarrow) or `records.csv` in out_dir; returns the path."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = os.path.join(os.fspath(out_dir), "records.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(zip(*(columns[k] for k in COLUMNS)))
        return path
    path = os.path.join(os.fspath(out_dir), "records.parquet")
    pq.write_table(pa.table({k: columns[k] for k in COLUMNS}), path)
    return path
