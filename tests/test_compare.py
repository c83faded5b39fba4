"""`bgjax compare` on evaluated workdirs written by the test."""

import json

import pytest

from bgjax.analysis import compare


def fake_run(root, name, *, model, masking, train_variant, accs, step=100, extra_steps=()):
    workdir = root / name
    config = dict(model=dict(name=model, masking=masking), train_variant=train_variant)
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config))
    for s in (*extra_steps, step):
        step_dir = workdir / "eval" / f"step_{s}"
        step_dir.mkdir(parents=True)
        variants = {k: {"accuracy": v, "count": 10} for k, v in accs.items()}
        gap = accs.get("mixed_same", 0) - accs.get("mixed_rand", 0) if s == step else None
        results = dict(step=s, variants=variants, bg_gap=gap, worst_group_accuracy=None)
        (step_dir / "results.json").write_text(json.dumps(results))
    return workdir


def test_compare_tables_runs_by_their_config(tmp_path):
    accs_a = {"original": 0.9, "mixed_same": 0.8, "mixed_rand": 0.5}
    accs_b = {"original": 0.7, "mixed_same": 0.65, "mixed_rand": 0.6, "only_bg_t": 0.2}
    a = fake_run(tmp_path, "a", model="convnext_atto", masking="none",
                 train_variant="original", accs=accs_a, extra_steps=(50,))  # fmt: skip
    b = fake_run(tmp_path, "b", model="vit_small", masking="early",
                 train_variant={"mixed_rand": 1.0}, accs=accs_b)  # fmt: skip
    sal = {"methods": {"input_gradient": {"foreground_fraction": 0.42}}}
    (b / "eval" / "step_100" / "saliency.json").write_text(json.dumps(sal))
    text = compare.compare([a, b], tmp_path / "out")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert header.split(" | ")[2:6] == ["original", "mixed_same", "mixed_rand", "only_bg_t"]
    assert "BG-gap" in header and "saliency fg (input grad)" in header
    assert "adv. challenge" not in header  # no run has it
    row_a = next(line for line in lines if "convnext_atto · none · train original" in line)
    assert "| 100 | 90.0 | 80.0 | 50.0 | — | 30.0 |" in row_a
    row_b = next(line for line in lines if "vit_small · early · train mixed_rand:1" in line)
    assert "| 70.0 | 65.0 | 60.0 | 20.0 | 5.0 | 42.0 |" in row_b
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["step"] for r in saved] == [100, 100]
    # an older evaluated step can be chosen; runs with equal configs get their folder name
    assert compare.load_run(a, 50)["step"] == 50
    text = compare.compare([a, a], tmp_path / "out2")
    assert text.count("convnext_atto · none · train original (a)") == 4  # 2 rows + 2 legend


def test_compare_errors(tmp_path):
    a = fake_run(tmp_path, "a", model="m", masking="none", train_variant="original",
                 accs={"original": 1.0})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="bgjax eval --workdir"):
        compare.load_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no evaluation of step 7; evaluated steps: 100"):
        compare.load_run(a, 7)
    with pytest.raises(ValueError, match="at least one"):
        compare.compare([], tmp_path / "out")
