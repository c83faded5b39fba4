"""`bgjax compare DIR [DIR ...] --out OUT`: evaluated workdirs side by side.

Reads each workdir's `eval/step_<N>/results.json` (the latest evaluated step, or `--step`) and,
when present, `adversarial.json` and `saliency.json` of the same step; labels each run by its
config (model name, masking strategy, training variant). Writes `OUT/compare.md` (one row per
run), `OUT/compare.json` and `OUT/compare.png` (accuracy per variant, one bar per run).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app

from bgjax import clflags, metrics
from bgjax import workdir as workdir_lib


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _variant_text(train_variant: Any) -> str:
    if isinstance(train_variant, Mapping):
        return "+".join(f"{k}:{v:g}" for k, v in train_variant.items())
    return str(train_variant)


def run_label(config: Mapping[str, Any] | None, results: Mapping[str, Any]) -> str:
    """'<model> · <masking> · train <variant>' from config.json (results.json as fallback)."""
    model = (config or {}).get("model", {})
    name = model.get("name", results.get("model", "?"))
    masking = model.get("masking", results.get("masking", "none"))
    variant = (config or {}).get("train_variant", results.get("train_variant"))
    label = f"{name} · {masking}"
    return label if variant is None else f"{label} · train {_variant_text(variant)}"


def load_run(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """{label, workdir, step, results, adversarial, saliency} of one evaluated workdir."""
    workdir = os.fspath(workdir)
    steps = workdir_lib.evaluated_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{workdir} has no eval/step_<N>/results.json: run `bgjax eval --workdir {workdir}`"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(
            f"{workdir} has no evaluation of step {step}; evaluated steps: "
            f"{', '.join(map(str, steps))}"
        )
    step_dir = workdir_lib.eval_dir(workdir, step)
    results = _read_json(os.path.join(step_dir, "results.json"))
    config = workdir_lib.read_config(workdir).to_dict() if workdir_lib.is_run(workdir) else None
    return dict(
        label=run_label(config, results),
        workdir=workdir,
        step=step,
        results=results,
        adversarial=_read_json(os.path.join(step_dir, "adversarial.json")),
        saliency=_read_json(os.path.join(step_dir, "saliency.json")),
    )


def _unique_labels(runs: list[dict]) -> None:
    """Runs with the same config label get their workdir's name appended."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    for r in runs:
        if counts[r["label"]] > 1:
            r["label"] = f"{r['label']} ({os.path.basename(os.path.normpath(r['workdir']))})"


_pct = functools.partial(metrics.pct, digits=1)


def table_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: accuracy per variant (union over runs, in first-seen order), BG-gap,
    worst-group / average accuracy, and the analyses' headline numbers where present."""
    variant_names = list(dict.fromkeys(v for r in runs for v in r["results"]["variants"]))
    extras = {
        "BG-gap": lambda r: r["results"].get("bg_gap"),
        "worst-group": lambda r: r["results"].get("worst_group_accuracy"),
        "average": lambda r: r["results"].get("average_accuracy"),
        "adv. challenge": lambda r: (r["adversarial"] or {}).get("challenge_accuracy"),
        "saliency fg (input grad)": lambda r: _saliency(r, "input_gradient"),
        "saliency fg (Grad-CAM)": lambda r: _saliency(r, "grad_cam"),
    }
    extras = {k: f for k, f in extras.items() if any(f(r) is not None for r in runs)}
    header = ["run", "step", *variant_names, *extras]
    rows = []
    for r in runs:
        accs = [r["results"]["variants"].get(v, {}).get("accuracy") for v in variant_names]
        rows.append(
            [r["label"], str(r["step"]), *map(_pct, accs), *(_pct(f(r)) for f in extras.values())]
        )
    return header, rows


def _saliency(run: Mapping[str, Any], method: str) -> float | None:
    return ((run["saliency"] or {}).get("methods", {}).get(method) or {}).get("foreground_fraction")


def markdown(runs: Sequence[Mapping[str, Any]]) -> str:
    header, rows = table_rows(runs)
    lines = [
        "# Comparison (accuracies and fractions in %)",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * (len(header) - 2),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- {r['label']}: `{r['workdir']}`" for r in runs),
    ]
    return "\n".join(lines) + "\n"


def compare(
    workdirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, step: int | None = None
) -> str:
    """Write compare.md/.json/.png for `workdirs` into `out_dir`; returns the Markdown."""
    from bgjax import plots

    if not workdirs:
        raise ValueError("compare needs at least one evaluated workdir")
    runs = [load_run(w, step) for w in workdirs]
    _unique_labels(runs)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(runs)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(runs, f, indent=2)
    series = {
        r["label"]: {k: v["accuracy"] for k, v in r["results"]["variants"].items()} for r in runs
    }
    plots.variant_accuracy_bars(series, os.path.join(out_dir, "compare.png"))
    return text


_OUT = clflags.string("out", None, "Output folder for compare.md/.json/.png.")
_STEP = clflags.checkpoint_step("step", "Evaluated step to compare (default: each run's latest).")


def main(argv: Sequence[str]) -> None:
    workdirs = list(argv[1:])
    if not workdirs:
        raise app.UsageError("usage: bgjax compare DIR [DIR ...] --out OUT")
    out = _OUT.value or "compare"
    if _STEP.value == "best":  # runs differ in their best step: evaluate each, then compare
        raise app.UsageError("--step best is per run: `bgjax eval --step best` each, then compare")
    try:
        print(compare(workdirs, out, _STEP.value))
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax compare: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")
