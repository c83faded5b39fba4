"""The papers' claims, checked on measured numbers: what `bgjax demo` reports as its findings.

A run's numbers come from two evaluations (`bgjax.tasks.classify.summarize`'s results): "iid",
the test split under the eight variants, and "ood", the balanced split (habitat independent of
the class) on the original images. The claims, per architecture:

- Xiao et al. (Noise or Signal): a plainly trained model leans on the background: its BG-gap
  (MIXED_SAME - MIXED_RAND accuracy) is at least 10 points and it names the class from the
  background alone (ONLY_BG_T) at twice chance or more.
- Both papers' remedies (training on MIXED_RAND; early / late masking, Aniraj et al.) cut the
  BG-gap to a third of the baseline's or less and raise the worst label x habitat group accuracy.
- Aniraj et al.: early masking beats late masking out of distribution (reported, not asserted:
  which one wins on the synthetic data is part of what the demo measures).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bgjax import metrics as metrics_lib

REMEDIES = ("mixed_rand", "early", "early_pred", "late")


def run_numbers(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers the claims use, from one run's "iid" and "ood" results."""
    iid, ood = evals["iid"], evals["ood"]
    return dict(
        variants={k: v["accuracy"] for k, v in iid["variants"].items()},
        bg_gap=iid["bg_gap"],
        ood_accuracy=ood["variants"]["original"]["accuracy"],
        worst_group_accuracy=ood["worst_group_accuracy"],
        average_accuracy=ood["average_accuracy"],
        iid_images=iid["num_examples"],
        ood_images=ood["num_examples"],
        ood_smallest_group=min(g["count"] for g in ood["groups"].values()),
        buckets=iid.get("buckets"),
    )


def check(runs: Mapping[str, Mapping[str, Mapping[str, Any]]], chance: float) -> dict[str, Any]:
    """{arch: {claim: held?}} for {arch: {strategy: run_numbers(...)}}; "early_vs_late_ood"
    holds the comparison's numbers."""
    out = {}
    for arch, by_strategy in runs.items():
        base = by_strategy.get("baseline")
        f: dict[str, Any] = {}
        if base is not None:
            f["baseline_bg_gap_at_least_10_points"] = base["bg_gap"] >= 0.10
            f["baseline_only_bg_t_at_least_2x_chance"] = base["variants"]["only_bg_t"] >= 2 * chance
            for strategy in REMEDIES:
                run = by_strategy.get(strategy)
                if run is None:
                    continue
                f[f"{strategy}_bg_gap_at_most_third_of_baseline"] = (
                    run["bg_gap"] <= base["bg_gap"] / 3
                )
                f[f"{strategy}_raises_worst_group_accuracy"] = (
                    run["worst_group_accuracy"] > base["worst_group_accuracy"]
                )
        if "early" in by_strategy and "late" in by_strategy:
            early, late = by_strategy["early"], by_strategy["late"]
            f["early_vs_late_ood"] = dict(
                early_accuracy=early["ood_accuracy"],
                late_accuracy=late["ood_accuracy"],
                early_worst_group=early["worst_group_accuracy"],
                late_worst_group=late["worst_group_accuracy"],
                better_on_balanced_split=(
                    "early" if early["ood_accuracy"] >= late["ood_accuracy"] else "late"
                ),
            )
        out[arch] = f
    return out


def markdown(findings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One bullet per claim and arch."""
    pct = metrics_lib.pct
    lines = []
    for arch, f in findings.items():
        for claim, held in f.items():
            if isinstance(held, bool):
                lines.append(f"- {arch}: {claim.replace('_', ' ')}: **{'yes' if held else 'NO'}**")
        el = f.get("early_vs_late_ood")
        if el:
            lines.append(
                f"- {arch}: balanced (OOD) split, early vs late masking: accuracy "
                f"{pct(el['early_accuracy'])} vs {pct(el['late_accuracy'])}, worst group "
                f"{pct(el['early_worst_group'])} vs {pct(el['late_worst_group'])} "
                f"(better: {el['better_on_balanced_split']}; the masking paper found early best)"
            )
    return lines
