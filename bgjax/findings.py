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

With `bgjax demo --baselines`, the field's group-robustness baselines (group-balanced sampling,
Group DRO, JTT, DFR) are each reported against ERM (the plain `baseline` run), not asserted: does
it raise the worst-group accuracy, with a reason on this data where it does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bgjax import metrics as metrics_lib

REMEDIES = ("mixed_rand", "early", "early_pred", "late")
BASELINES = ("group_balanced", "group_dro", "jtt", "dfr")
# Why a baseline may leave ERM's worst group where it is on the demo's data (shown only when it
# did): 9 classes x 9 habitats, the habitat = the class in 90% of 9000 training images, so each
# of the 72 minority groups has ~12 images; 400 steps of batch 64 are under 3 epochs; the
# balanced test split has 20 images per group, so one group's accuracy moves in steps of 5%.
WHY_NOT = {
    "group_balanced": (
        "every group gets 1/81 of the draws, so each minority group's ~12 images are repeated "
        "~25 times in 400 steps and the majority groups are cut to 1/8: the network sees fewer "
        "distinct images of each shape"
    ),
    "group_dro": (
        "on group-balanced batches every group's loss is seen at every step, and the online "
        "weights move toward the groups with the highest loss; with ~12 images per minority "
        "group the network can fit them (training loss near zero in every group) without "
        "learning the shape, and then the weights have nothing left to correct: the strong "
        "L2 regularisation the authors pair with it (wd 1.0) is not part of this run"
    ),
    "jtt": (
        "the identification run, at half of ERM's steps, misclassifies many majority-group "
        "images too, so they make up most of the upweighted set and the minority groups get "
        "far fewer of the draws than the 8/9 that group-balanced sampling gives them"
    ),
    "dfr": (
        "DFR re-fits only the last layer of the ERM run, whose features carry little shape "
        "information, on ~5 images per group (half the balanced validation split, cut to its "
        "smallest group), and picks C by a worst group of ~11 tuning images, often 0 for all C"
    ),
}


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
    holds the comparison's numbers, "baselines_vs_erm" each baseline's (`against_erm`)."""
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
            compared = {
                method: against_erm(by_strategy[method], base, WHY_NOT[method])
                for method in BASELINES
                if method in by_strategy
            }
            if compared:
                f["baselines_vs_erm"] = compared
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


def against_erm(run: Mapping[str, Any], erm: Mapping[str, Any], why_not: str) -> dict[str, Any]:
    """A baseline's balanced-split numbers next to ERM's; `why` only when the worst group did
    not improve."""
    raises = run["worst_group_accuracy"] > erm["worst_group_accuracy"]
    return dict(
        worst_group_accuracy=run["worst_group_accuracy"],
        erm_worst_group_accuracy=erm["worst_group_accuracy"],
        ood_accuracy=run["ood_accuracy"],
        erm_ood_accuracy=erm["ood_accuracy"],
        bg_gap=run["bg_gap"],
        erm_bg_gap=erm["bg_gap"],
        raises_worst_group_accuracy=raises,
        why=None if raises else why_not,
    )


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
        for method, c in f.get("baselines_vs_erm", {}).items():
            line = (
                f"- {arch}: {method} vs ERM (reported): worst group "
                f"{pct(c['worst_group_accuracy'])} vs {pct(c['erm_worst_group_accuracy'])}, "
                f"balanced accuracy {pct(c['ood_accuracy'])} vs {pct(c['erm_ood_accuracy'])}, "
                f"BG-gap {pct(c['bg_gap'])} vs {pct(c['erm_bg_gap'])}; raises worst-group "
                f"accuracy: **{'yes' if c['raises_worst_group_accuracy'] else 'NO'}**"
            )
            lines.append(line + (f" (why, on this data: {c['why']})" if c["why"] else ""))
    return lines
