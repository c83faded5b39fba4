"""The demo's control flow without training: interruption stops it, findings are computed."""

import pytest

from bgjax import demo


def test_preempted_run_stops_the_demo(tmp_path, monkeypatch):
    calls = []

    def fake_train(config, workdir):
        calls.append(workdir)
        return {"preempted": True}

    monkeypatch.setattr(demo.train_lib, "train", fake_train)
    config = demo.run_config("convnext", "baseline", demo.QUICK)
    with pytest.raises(demo.Interrupted, match="convnext_baseline"):
        demo.train_if_needed(config, str(tmp_path / "convnext_baseline"))
    assert calls == [str(tmp_path / "convnext_baseline")]


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
    f = demo.findings(runs)["convnext"]
    assert f["baseline_bg_gap_at_least_10_points"] and f["baseline_only_bg_t_at_least_2x_chance"]
    assert f["mixed_rand_bg_gap_at_most_third_of_baseline"]
    assert f["mixed_rand_raises_worst_group_accuracy"]
    assert not f["early_bg_gap_at_most_third_of_baseline"]
    assert not f["early_raises_worst_group_accuracy"]
    assert f["early_vs_late_ood"]["better_on_balanced_split"] == "early"
