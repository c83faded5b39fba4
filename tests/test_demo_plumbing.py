"""The demo as a sweep, without training: its runs are the configs it names, interruption stops
it, findings follow the numbers."""

import pytest

from bgjax import config_utils, demo, findings, sweep


def test_demo_jobs_are_the_packaged_experiments():
    """Each demo run is synthetic.py / segmenter.py at the demo's sizes, in stage order; the
    predicted-mask runs read the segmenter trained in the same root."""
    _, full = demo.jobs("ROOT")
    names = [j.name for j in full]
    assert names[0] == "segmenter" and full[0].stage == 0 and not full[0].evals
    assert [j.stage for j in full[1:]] == [1] * 5 + [2] * 5  # one stage per arch
    assert "convnext-early_pred" in names and "vit-late" in names and len(names) == 11
    late = dict((j.name, j) for j in full)["convnext-late"].config()
    assert late.model.patch_size == 2 and late.model.masking == "late"  # a 4x4 stage-3 grid
    pred = dict((j.name, j) for j in full)["vit-early_pred"].config()
    assert pred.mask_source == "ROOT/segmenter" and pred.model.masking == "early"
    assert pred.total_steps == 800 and pred.checkpoint.every_steps == 400
    base = config_utils.load_config("synthetic.py:arch=convnext,strategy=mixed_rand,size=small")
    mixed = dict((j.name, j) for j in full)["convnext-mixed_rand"].config()
    assert mixed.train_variant == "mixed_rand" and mixed.model == base.model
    _, quick = demo.jobs("ROOT", quick=True)
    assert [j.name for j in quick] == [
        "convnext-baseline", "convnext-mixed_rand", "convnext-early", "convnext-late"
    ]  # fmt: skip
    iid = [e for e in quick[0].evals if e["name"] == "iid"][0]
    assert iid["data"]["test_size"] == 450 and iid["variants"] == "all"


def test_root_placeholder_needs_a_root():
    sweep_config, _ = demo.jobs("ROOT")
    with pytest.raises(ValueError, match="needs the sweep root"):
        sweep.expand(sweep_config)


def test_staged_slurm_commands_wait_for_earlier_stages():
    _, jobs = demo.jobs("ROOT")
    commands = sweep.launch_commands("ROOT", jobs, "slurm")
    assert commands[0].startswith('BGJAX_STAGE0_JOBS+=":$(sbatch --job-name=segmenter ')
    assert "--parsable launch/slurm.sbatch" in commands[0]
    for command in commands[1:6]:  # stage 1 waits for stage 0 and records its own ids
        assert command.startswith('BGJAX_STAGE1_JOBS+=":$(sbatch --job-name=convnext-')
        assert "--dependency=afterok$BGJAX_STAGE0_JOBS " in command
    for command in commands[6:]:
        assert command.startswith("sbatch --job-name=vit-")
        assert "--dependency=afterok$BGJAX_STAGE0_JOBS$BGJAX_STAGE1_JOBS " in command
    assert "--config.mask_source=ROOT/segmenter" in commands[4]


def test_preempted_run_stops_the_sweep(tmp_path, monkeypatch):
    calls = []

    def fake_train(config, workdir):
        calls.append(workdir)
        return {"preempted": True}

    monkeypatch.setattr(sweep.train_lib, "train", fake_train)
    _, jobs = demo.jobs(str(tmp_path), quick=True)
    with pytest.raises(sweep.Interrupted, match="convnext-baseline"):
        sweep.run_local(str(tmp_path), jobs, progress=False)
    assert calls == [str(tmp_path / "convnext-baseline")]  # the next run never started


def _run(bg_gap, worst, ood=0.5, only_bg_t=0.5):
    return dict(
        bg_gap=bg_gap,
        worst_group_accuracy=worst,
        ood_accuracy=ood,
        variants={"only_bg_t": only_bg_t},
    )


def test_findings_follow_the_numbers():
    runs = {
        "convnext": {
            "baseline": _run(0.30, 0.0, ood=0.4),
            "mixed_rand": _run(0.05, 0.2, ood=0.6),
            "early": _run(0.12, 0.0, ood=0.7),  # gap above a third; worst group not raised
            "late": _run(0.20, 0.1, ood=0.5),
        }
    }
    f = findings.check(runs, chance=1 / 9)["convnext"]
    assert f["baseline_bg_gap_at_least_10_points"] and f["baseline_only_bg_t_at_least_2x_chance"]
    assert f["mixed_rand_bg_gap_at_most_third_of_baseline"]
    assert f["mixed_rand_raises_worst_group_accuracy"]
    assert not f["early_bg_gap_at_most_third_of_baseline"]
    assert not f["early_raises_worst_group_accuracy"]
    assert f["early_vs_late_ood"]["better_on_balanced_split"] == "early"
    assert not findings.check({"vit": {"baseline": _run(0.3, 0, only_bg_t=0.2)}}, chance=0.25)[
        "vit"
    ]["baseline_only_bg_t_at_least_2x_chance"]


def test_manifest_gives_each_run_its_evals(tmp_path):
    """`bgjax aggregate` reads per-run evals: the segmenter stage is not evaluated."""
    from bgjax import aggregate

    sweep_config, jobs = demo.jobs(str(tmp_path))
    sweep.write_manifest(str(tmp_path), sweep_config, jobs)
    evals = aggregate.load_evals(tmp_path)
    assert evals["segmenter"] == []
    assert [e.name for e in evals["vit-early"]] == ["iid", "ood"]
    assert evals["vit-early"][1].variants == ("original",)
