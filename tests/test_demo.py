"""`bgjax demo --quick` end to end: both papers' findings must come out of training. It runs from
a non-editable install (`pip install .` into a fresh virtualenv) outside the repository, which
also checks that a wheel ships everything the commands need, the packaged configs included.
`bgjax demo --baselines` is checked without training (its runs, table, findings and flag): CI
does not run it end to end."""

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


# ---------------------------------------------------------------------------------------------
# `bgjax demo --baselines`, without training: its runs, its table and findings, its flag.

BASELINE_RUNS = ["convnext-jtt_identify", "convnext-baseline", "convnext-mixed_rand",
                 "convnext-early", "convnext-late", "convnext-group_balanced",
                 "convnext-group_dro", "convnext-jtt"]  # fmt: skip


def test_baselines_sweep_adds_the_methods_next_to_one_erm_run():
    from bgjax import demo

    sweep_config, jobs = demo.jobs("ROOT", baselines=True)
    assert [j.name for j in jobs] == BASELINE_RUNS
    by_name = {j.name: j for j in jobs}
    identify = by_name["convnext-jtt_identify"]
    assert identify.stage == 0 and not identify.evals  # scored only through the JTT run
    assert {j.stage for j in jobs[1:]} == {1}  # after the identification run
    assert [dict(j.points).get("strategy") for j in jobs].count("baseline") == 1  # ERM: once
    erm, jtt = by_name["convnext-baseline"].config(), by_name["convnext-jtt"].config()
    assert jtt.data.upweight.errors_of == "ROOT/convnext-jtt_identify"
    assert jtt.data.upweight.factor == 20 and jtt.data.sampling == "natural"
    assert identify.config().total_steps == erm.total_steps // 2
    dro = by_name["convnext-group_dro"].config().loss.group_dro
    assert (dro.eta, dro.adjustment) == (0.01, 0.0) and erm.loss.group_dro.eta == 0
    assert by_name["convnext-group_dro"].config().data.sampling == "group_balanced"
    assert by_name["convnext-group_balanced"].config().data.sampling == "group_balanced"
    same = lambda c: (  # the demo's data, model and schedule: ERM's
        {k: v for k, v in c.data.items() if k not in ("sampling", "upweight")},
        c.model, c.total_steps, c.optimizer, c.batch_size, c.seed,
    )  # fmt: skip
    for name in ("convnext-group_dro", "convnext-jtt", "convnext-group_balanced"):
        assert same(by_name[name].config()) == same(erm) and erm.total_steps == 400
    # DFR re-fits the ERM run and is scored like the trained runs.
    (dfr,) = sweep_config.dfr
    assert dfr["run"] == "convnext-baseline" and dfr["split"] == "val"
    scored = demo.scored_runs(sweep_config, jobs)
    assert [name for name, _, _ in scored] == BASELINE_RUNS[1:] + ["convnext-dfr"]
    assert scored[-1][1] == {"arch": "convnext", "strategy": "dfr"}
    assert scored[-1][2] == by_name["convnext-baseline"].evals
    iid = [e for e in scored[0][2] if e["name"] == "iid"][0]
    assert iid["data"]["test_size"] == 900  # --baselines alone: the full IID set


def test_baselines_leave_the_default_demos_alone():
    from bgjax import demo

    for quick in (False, True):
        config, jobs = demo.jobs("ROOT", quick=quick)
        assert "dfr" not in config and not demo.scored_runs(config, jobs)[-1][0].endswith("dfr")
        assert not any("jtt" in j.name or "group" in j.name for j in jobs)
    _, quick_baselines = demo.jobs("ROOT", quick=True, baselines=True)
    assert [j.name for j in quick_baselines] == BASELINE_RUNS
    assert quick_baselines[1].evals[0]["data"]["test_size"] == 450


def _fake_evals(accuracy: float, worst: float, bg_gap: float) -> dict:
    """The "iid" and "ood" results `findings.run_numbers` reads, with made-up numbers."""
    from bgjax import variants

    iid = dict(
        variants={v: {"accuracy": accuracy} for v in variants.VARIANTS},
        bg_gap=bg_gap,
        num_examples=900,
    )
    groups = {"g0": {"count": 20, "accuracy": worst}, "g1": {"count": 30, "accuracy": 1.0}}
    ood = dict(
        variants={"original": {"accuracy": accuracy}},
        worst_group_accuracy=worst,
        average_accuracy=accuracy,
        num_examples=50,
        groups=groups,
    )
    return dict(iid=iid, ood=ood)


def test_baselines_summary_is_one_table_with_reported_findings(tmp_path):
    from bgjax import demo

    numbers = {  # strategy -> (accuracy, worst group, BG-gap)
        "baseline": (0.6, 0.10, 0.30), "mixed_rand": (0.7, 0.30, 0.02),
        "early": (0.8, 0.35, 0.0), "late": (0.7, 0.20, 0.05),
        "group_balanced": (0.65, 0.25, 0.20), "group_dro": (0.6, 0.10, 0.28),
        "jtt": (0.55, 0.05, 0.30), "dfr": (0.62, 0.15, 0.25),
    }  # fmt: skip
    results = {"convnext": {s: _fake_evals(*n) for s, n in numbers.items()}}
    _, jobs = demo.jobs(str(tmp_path), baselines=True)
    timing = {"total": {"wall_s": 1.0, "cpu_s": 2.0}}
    methods = {"convnext": {"group_dro": {"eta": 0.01}}}
    summary = demo.summarize(
        results, [j for j in jobs if j.evals], quick=False, timing=timing, methods=methods
    )
    assert summary["mode"] == "baselines" and summary["methods"] == methods
    text = demo.summary_markdown(summary)
    rows = [line for line in text.splitlines() if line.startswith("| convnext |")]
    assert [row.split(" | ")[1] for row in rows] == list(numbers)  # one table, every method
    assert "| convnext | group_dro | 60.0 |" in text and "- convnext group_dro: eta 0.01" in text
    compared = summary["findings"]["convnext"]["baselines_vs_erm"]
    assert list(compared) == ["group_balanced", "group_dro", "jtt", "dfr"]
    raised = {m: c["raises_worst_group_accuracy"] for m, c in compared.items()}
    assert raised == {"group_balanced": True, "group_dro": False, "jtt": False, "dfr": True}
    assert compared["group_balanced"]["why"] is None and compared["jtt"]["why"]
    assert "group_dro vs ERM (reported): worst group 10.0 vs 10.0" in text
    assert "raises worst-group accuracy: **NO** (why, on this data: " in text
    # The paper claims keep their booleans (the baselines are reported, not claims).
    assert summary["findings"]["convnext"]["mixed_rand_raises_worst_group_accuracy"] is True
    assert not any(k.startswith(("group_", "jtt", "dfr")) for k in summary["findings"]["convnext"])


def test_baselines_flag_reaches_the_demo(monkeypatch, capsys):
    from absl import flags
    from absl.testing import flagsaver

    from bgjax import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda workdir, **kw: calls.append((workdir, kw)))
    monkeypatch.setattr(demo, "summary_markdown", lambda summary: "table")
    with flagsaver.flagsaver():
        flags.FLAGS(["bgjax", "--baselines"])
        demo.main(["bgjax"])
    assert calls == [("runs/demo_baselines", {"quick": False, "baselines": True})]
    assert "table" in capsys.readouterr().out
