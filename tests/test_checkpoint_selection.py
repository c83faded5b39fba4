"""Checkpoint selection by group metrics: the periodic evaluation logs them whenever the data
has groups, `checkpoint.best_metric` can name them, and a name that is never logged is an error
before training starts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgjax import checkpoint, config_utils, parallel, train
from bgjax.data import DatasetInfo
from bgjax.tasks import classify

# A validation split shaped like Waterbirds': balanced within each class only.
VAL_COUNTS = (6, 6, 2, 2)  # landbird/land, landbird/water, waterbird/land, waterbird/water


def _waterbirds_like_info() -> DatasetInfo:
    groups = np.repeat(np.arange(4), VAL_COUNTS)
    return DatasetInfo(
        name="waterbirds",
        split="val",
        class_names=("landbird", "waterbird"),
        labels=(groups // 2).astype(np.int32),
        habitats=(groups % 2).astype(np.int32),
        habitat_names=("land", "water"),
        train_group_proportions=np.array([0.73, 0.04, 0.01, 0.22]),
    )


def _predictions(info: DatasetInfo, right_per_group) -> dict:
    """Predictions getting the first `right_per_group[g]` images of each group right."""
    groups = info.labels * 2 + info.habitats
    rank = np.concatenate([np.arange(n) for n in VAL_COUNTS])
    right = rank < np.asarray(right_per_group)[groups]
    pred = np.where(right, info.labels, 1 - info.labels)
    return {"original": dict(pred=pred, label=info.labels, habitat=info.habitats)}


def test_best_checkpoint_follows_worst_group_not_average_accuracy(tmp_path):
    info = _waterbirds_like_info()
    # Step 1: every landbird right, no waterbird (average 75%, worst group 0%).
    # Step 2: half the landbirds, every waterbird (average 62.5%, worst group 50%).
    logged = {
        step: classify.log_metrics(classify.summarize(_predictions(info, right), info))
        for step, right in ((1, (6, 6, 0, 0)), (2, (3, 3, 2, 2)))
    }
    assert logged[1]["eval/original/accuracy"] > logged[2]["eval/original/accuracy"]
    assert (logged[1]["eval/worst_group_accuracy"], logged[2]["eval/worst_group_accuracy"]) == (
        0.0,
        0.5,
    )
    assert logged[2]["eval/group/landbird/water/accuracy"] == 0.5
    # The train-proportion-weighted average: 0.73 * 0.5 + 0.04 * 0.5 + 0.01 + 0.22.
    assert logged[2]["eval/average_accuracy"] == pytest.approx(0.615)
    assert set(logged[1]) == set(classify.metric_names(info, ("original",)))

    mesh = parallel.make_mesh([("data", -1)])
    state = {"x": jax.device_put(jnp.zeros(2), parallel.replicated(mesh))}
    for name, best in (("eval/original/accuracy", 1), ("eval/worst_group_accuracy", 2)):
        ckpt = checkpoint.Checkpointer(
            tmp_path / name.replace("/", "_"), keep=1, keep_best=1, best_metric=name,
            async_save=False,
        )  # fmt: skip
        for step, metrics in logged.items():
            ckpt.save(step, state, metrics=metrics)
        assert ckpt.best_step() == best, name
        ckpt.close()


def _tiny_config(**overrides):
    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    config.progress_bar = False
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def test_training_logs_group_metrics_and_keeps_the_best_worst_group_step(tmp_path):
    config = _tiny_config(**{
        "checkpoint.best_metric": "eval/worst_group_accuracy", "checkpoint.keep": 1,
        "checkpoint.keep_best": 1, "checkpoint.every_steps": 2, "eval.every_steps": 2,
    })  # fmt: skip
    config.total_steps = 4
    train.train(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    worst = {
        r["step"]: r["eval/worst_group_accuracy"] for r in rows if "eval/worst_group_accuracy" in r
    }
    assert sorted(worst) == [2, 4]
    evaluated = next(r for r in rows if r["step"] == 4)
    assert "eval/average_accuracy" in evaluated
    assert any(k.startswith("eval/group/") for k in evaluated)
    ckpt = checkpoint.Checkpointer(
        tmp_path / "checkpoints", best_metric="eval/worst_group_accuracy", keep_best=1
    )
    assert worst[ckpt.best_step()] == max(worst.values())
    ckpt.close()


@pytest.mark.parametrize(
    "best_metric, variants",
    [("eval/worst_group", ("original",)), ("eval/worst_group_accuracy", ("mixed_rand",))],
)
def test_an_unlogged_best_metric_fails_before_training(tmp_path, best_metric, variants):
    config = _tiny_config(**{"checkpoint.best_metric": best_metric, "eval.variants": variants})
    with pytest.raises(ValueError, match=f"checkpoint.best_metric '{best_metric}' is not logged"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
