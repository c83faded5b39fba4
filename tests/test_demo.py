"""`bgjax demo --quick` end to end: both papers' findings must come out of training."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bgjax import demo

REPO = Path(__file__).resolve().parents[1]


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    # One CPU device, as a user runs it (conftest simulates 4 for the sharding tests).
    env = dict(os.environ)
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.pop("XLA_FLAGS", "")).strip()  # fmt: skip
    if xla_flags:  # XLA reads a blank XLA_FLAGS as a file name
        env["XLA_FLAGS"] = xla_flags
    done = subprocess.run(
        [sys.executable, "-m", "bgjax.cli", "demo", "--quick", "--workdir", str(workdir)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    first = _demo(workdir)
    return workdir, first, json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
def test_quick_demo_reproduces_the_findings(quick_demo):
    workdir, first, summary = quick_demo
    chance = 1.0 / summary["dataset"]["num_classes"]
    assert set(summary["runs"]) == set(demo.QUICK.archs)
    for arch, runs in summary["runs"].items():
        base = runs["baseline"]
        # Paper 1: the baseline leans on the background.
        assert base["bg_gap"] >= 0.10, (arch, base)
        assert base["variants"]["only_bg_t"] >= 2 * chance, (arch, base)
        # Mixed-Rand training and early masking remove most of that reliance and help the
        # hardest label x habitat group of the balanced split.
        for strategy in ("mixed_rand", "early"):
            run = runs[strategy]
            assert run["bg_gap"] <= base["bg_gap"] / 3, (arch, strategy, run["bg_gap"])
            assert run["worst_group_accuracy"] > base["worst_group_accuracy"], (arch, strategy)
        assert set(runs) == {"baseline", "mixed_rand", "early", "late"}  # no segmenter run
        early_late = summary["findings"][arch]["early_vs_late_ood"]
        assert early_late["better_on_balanced_split"] in ("early", "late")
        assert runs["early"]["iid_images"] > 0 and runs["early"]["ood_images"] > 0
    for name in ("summary.md", "accuracy_per_variant.png", "bg_gap_worst_group.png"):
        assert (workdir / name).stat().st_size > 0
    assert "| convnext | baseline |" in first.stdout  # the table is printed


@pytest.mark.slow
def test_quick_demo_rerun_skips_finished_runs(quick_demo):
    workdir, _, summary = quick_demo
    _demo(workdir)
    again = json.loads((workdir / "summary.json").read_text())
    assert not any(t.get("trained") for t in again["timing"].values())
    assert again["runs"] == summary["runs"]
