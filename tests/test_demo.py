"""`bgjax demo --quick` end to end: both papers' findings must come out of training. It runs from
a non-editable install (`pip install .` into a fresh virtualenv) outside the repository, which
also checks that a wheel ships everything the commands need, the packaged configs included."""

import json
import os
import re
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # One CPU device, as a user runs it (conftest simulates 4 for the sharding tests).
    env = dict(os.environ)
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.pop("XLA_FLAGS", "")).strip()  # fmt: skip
    if xla_flags:  # XLA reads a blank XLA_FLAGS as a file name
        env["XLA_FLAGS"] = xla_flags
    env.pop("PYTHONPATH", None)  # bgjax must come from the install
    return env


def _install(root: Path) -> Path:
    """`pip install .` (not editable) of this checkout into a fresh virtualenv; its bin/.

    The dependencies are this interpreter's (a .pth file adds its site-packages after the new
    one), so nothing is downloaded. pip builds in the source tree, so it builds a copy of what
    the wheel is made of, leaving the checkout untouched."""
    src = root / "src"
    shutil.copytree(REPO / "bgjax", src / "bgjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site, "_bgjax_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    # --ignore-installed: pip sees this venv's editable bgjax through the .pth and must not
    # try to replace it.
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", "--disable-pip-version-check", str(src)],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return root / "venv" / "bin"


def _bgjax(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [bin_dir / "bgjax", *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _demo(bin_dir: Path, workdir: Path) -> subprocess.CompletedProcess:
    return _bgjax(bin_dir, "demo", "--quick", "--workdir", str(workdir), cwd=workdir.parent)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin/ of a fresh install, checked: bgjax imports from there, and trains by config name."""
    root = tmp_path_factory.mktemp("install")
    bin_dir = _install(root)
    code = "import bgjax; print(bgjax.__file__)"
    where = subprocess.run([bin_dir / "python", "-c", code], cwd=root, env=_env(),
                           capture_output=True, text=True, check=True)  # fmt: skip
    module = Path(where.stdout.strip())
    assert module.is_relative_to(root / "venv") and not module.is_relative_to(REPO), module
    # A packaged config by name, from outside the repository (no periodic evaluation: the demo
    # evaluates, and it would add a third of this check's time).
    _bgjax(bin_dir, "train", "--config", "synthetic.py:size=tiny", "--workdir",
           str(root / "tiny"), "--config.eval.every_steps=0", "--noconfig.progress_bar",
           cwd=root)  # fmt: skip
    assert (root / "tiny" / "checkpoints" / "6").is_dir()
    return bin_dir


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, installed):
    workdir = tmp_path_factory.mktemp("demo")
    first = _demo(installed, workdir)
    return workdir, first, json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
def test_quick_demo_reproduces_the_findings(quick_demo):
    workdir, first, summary = quick_demo
    chance = 1.0 / summary["dataset"]["num_classes"]
    assert set(summary["runs"]) == {"convnext"}
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
def test_quick_demo_rerun_skips_finished_runs(quick_demo, installed):
    workdir, _, summary = quick_demo
    _demo(installed, workdir)
    again = json.loads((workdir / "summary.json").read_text())
    assert not any(t.get("trained") for t in again["timing"].values())
    assert again["runs"] == summary["runs"]
