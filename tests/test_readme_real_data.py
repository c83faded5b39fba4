"""README's real-data commands run as written, on trees in the published layouts that the test
writes (tests/fake_trees.py): only the /data/... paths and runs/ are replaced, and training
commands get the tiny model size (a seconds-long run) added to their config argument."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fake_trees import write_cub, write_waterbirds_release

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Every `bgjax ...` line of README's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("bgjax "):
                commands.append(line)
    return commands


def readme_command(*fragments: str) -> str:
    """The one README command holding every fragment (the test fails if README drops it)."""
    found = [c for c in readme_commands() if all(f in c for f in fragments)]
    assert len(found) == 1, f"README should hold one command with {fragments}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cub = write_cub(root, per_class=4, size=32)
    wb = root / "waterbird_complete95_forest2water2"
    wb.mkdir()
    write_waterbirds_release(wb, cub)
    return {
        "/data/CUB_200_2011": str(cub),
        "/data/waterbird_complete95_forest2water2": str(wb),
        "runs/": str(root / "runs") + "/",
    }


def run(command: str, paths: dict[str, str], tiny: bool = False) -> str:
    for written, here in paths.items():
        command = command.replace(written, here)
    argv = shlex.split(command)[1:]  # without "bgjax"
    if tiny:  # the README's config, at the tests' model size
        i = next(i for i, a in enumerate(argv) if a.startswith("--config=") or a == "--config")
        i += argv[i] == "--config"
        argv[i] += ",size=tiny" if ":" in argv[i] else ":size=tiny"
    done = subprocess.run(
        [sys.executable, "-m", "bgjax.cli", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def results(out: Path) -> dict:
    (path,) = out.glob("eval/step_*/results.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_cub_run_scored_on_waterbirds_with_species_labels(trees):
    """README: a CUB (species) run -> the Waterbirds test split, per-group accuracy."""
    train = (
        "bgjax train --config cub.py:arch=convnext --workdir runs/cub_cnx "
        "--config.data.root=/data/CUB_200_2011 --config.total_steps=2"
    )
    run(train, trees, tiny=True)
    workdir = Path(trees["runs/"]) / "cub_cnx"
    run(readme_command("--workdir runs/cub_cnx", "--dataset waterbirds"), trees)
    r = results(workdir)
    assert r["dataset"] == "waterbirds" and r["trained_on"] == "cub"
    assert len(r["groups"]) == 4 and r["worst_group_accuracy"] is not None
    assert sum(g["count"] for g in r["groups"].values()) == r["variants"]["original"]["count"]


@pytest.mark.slow
def test_waterbirds_erm_selected_by_worst_group_accuracy(trees):
    """README: Waterbirds ERM; `bgjax eval --step best` scores the checkpoint that validation
    worst-group accuracy chose."""
    run(readme_command("waterbirds.py:arch=convnext", "runs/wb_erm"), trees, tiny=True)
    workdir = Path(trees["runs/"]) / "wb_erm"
    run(readme_command("--workdir runs/wb_erm", "--step best"), trees)
    r = results(workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    key = "eval/worst_group_accuracy"
    evals = {row["step"]: row[key] for row in logged if key in row}
    assert len(evals) >= 2 and evals[r["step"]] == max(evals.values())
    assert r["dataset"] == "waterbirds" and len(r["groups"]) == 4
