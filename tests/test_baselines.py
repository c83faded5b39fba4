"""The field's baselines: balanced and upweighted sampling, group DRO, selection by validation."""

import dataclasses
import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bgjax import config_utils, masks, parallel, train_state, train_step
from bgjax import data as data_lib
from bgjax.data import DatasetInfo, pipeline, sampling
from bgjax.tasks import group_dro

NUM_CLASSES, NUM_HABITATS = 2, 2


class GroupSource:
    """Flat 8 px images of value i + 1 (a batch names its examples, `_indices`); example i has
    the label and habitat of its group (`counts` examples per group, in group order)."""

    def __init__(self, counts=(30, 4, 2, 12), habitats=True):
        groups = np.repeat(np.arange(len(counts)), counts)
        labels = (groups // NUM_HABITATS).astype(np.int32)
        self.info = DatasetInfo(
            name="grouped", split="train", class_names=("a", "b"), labels=labels,
            habitats=(groups % NUM_HABITATS).astype(np.int32) if habitats else None,
            habitat_names=("land", "water") if habitats else None,
        )  # fmt: skip

    def __len__(self):
        return len(self.info.labels)

    def __getitem__(self, index):
        habitat = -1 if self.info.habitats is None else self.info.habitats[index]
        return dict(
            image=np.full((8, 8, 3), index + 1, np.uint8), mask=np.ones((8, 8), np.uint8),
            bbox=np.array([0, 0, 8, 8], np.int32), label=self.info.labels[index],
            habitat=np.int32(habitat),
        )  # fmt: skip


class BoxedSource(GroupSource):
    """GroupSource with the object in the top-left quarter: backgrounds to swap (mixed)."""

    def __getitem__(self, index):
        example = super().__getitem__(index)
        example["mask"] = np.zeros((8, 8), np.uint8)
        example["mask"][:4, :4] = 1
        return dict(example, bbox=np.array([0, 0, 4, 4], np.int32))


def _untrained_run(workdir, **data):
    """A tiny ViT run's workdir with the initial state saved as its checkpoint at step 2."""
    from bgjax import checkpoint
    from bgjax import workdir as workdir_lib

    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    config.total_steps = 2
    config.data.update(data)
    source = data_lib.get_source(config.data, "train")
    workdir_lib.write_run_files(workdir, config, source.info)
    setup = train_state.make_setup(config, source.info, parallel.make_mesh(config.mesh))
    saver = checkpoint.Checkpointer(workdir / "checkpoints", keep_best=0, async_save=False)
    saver.save(2, setup.init())
    saver.close()
    return config, source


def _stream(source, mode="group_balanced", seed=0, upweight_file="", factor=1, variant="original"):
    data = dict(sampling=mode, upweight=dict(file=upweight_file, factor=factor))
    plan = sampling.Sampling.from_config(data)
    return iter(
        pipeline.build(
            source, batch_size=4, image_size=8, train=True, seed=seed, sampling=plan,
            variant=variant,
            read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2),
        )
    )  # fmt: skip


def _indices(it, batches):
    return np.concatenate([next(it)["image"][:, 0, 0, 0].astype(int) - 1 for _ in range(batches)])


def _labels_and_habitats(it, batches):
    rows = [next(it) for _ in range(batches)]
    return (np.concatenate([r[k] for r in rows]) for k in ("label", "habitat"))


@pytest.mark.parametrize("mode,strata", [("group_balanced", 4), ("class_balanced", 2)])
def test_balanced_epochs_draw_every_stratum_equally_often(mode, strata):
    source = GroupSource()  # 48 examples; groups 30/4/2/12, classes 34/14
    labels, habitats = _labels_and_habitats(_stream(source, mode), 2 * 48 // 4)  # two epochs
    by = labels * NUM_HABITATS + habitats if mode == "group_balanced" else labels
    for epoch in (slice(0, 48), slice(48, 96)):
        counts = np.bincount(by[epoch], minlength=strata)
        assert counts.tolist() == [48 // strata] * strata, counts


@pytest.mark.parametrize("variant", ["mixed_rand", "mixed_next"])
def test_group_balanced_mixed_variants_balance_the_foreground_classes(variant):
    """No habitats (as IN-9): a mixed variant's background class is drawn after the example,
    uniformly (MIXED_RAND) or from the class (MIXED_NEXT), so the groups are balanced through
    the classes; the same source on ORIGINAL has no groups to balance."""
    source = BoxedSource(habitats=False)  # classes 34 / 14
    labels, _ = _labels_and_habitats(_stream(source, variant=variant), 48 // 4)
    assert np.bincount(labels, minlength=2).tolist() == [24, 24]
    with pytest.raises(ValueError, match="no label x habitat groups"):
        _stream(source, variant="original")
    plan = sampling.Sampling("group_balanced")
    assert plan.for_variant("mixed_same").mode == "class_balanced"
    assert plan.for_variant({"mixed_rand": 1.0}) is plan  # a mixture keeps the habitats' groups


def test_balanced_epoch_cycles_each_stratum_before_repeating_and_differs_per_epoch():
    strata = np.repeat([0, 1], [10, 2])
    first, second = (sampling.balanced_epoch(strata, seed=3, epoch=e) for e in (0, 1))
    assert len(first) == 12 and not np.array_equal(first, second)
    big = first[first < 10]
    assert len(big) == 6 and len(set(big.tolist())) == 6  # a large group: no repeat in a cycle
    assert np.bincount(first[first >= 10] - 10).tolist() == [3, 3]  # a small one: cycled


def test_same_seed_same_order_other_seed_differs():
    source = GroupSource()
    order = lambda seed: _indices(_stream(source, seed=seed), 24)
    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))


def test_resampled_iterator_resumes_from_its_checkpoint(tmp_path):
    source = GroupSource()
    it = _stream(source, seed=5)
    for _ in range(10):  # into the second epoch (12 batches each)
        next(it)
    manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
    manager.save(10, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _indices(it, 6)
    resumed = _stream(source, seed=5)
    manager.restore(10, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    manager.close()
    np.testing.assert_array_equal(expected, _indices(resumed, 6))


def test_upweighted_epoch_repeats_the_listed_examples(tmp_path):
    source = GroupSource()
    path = str(tmp_path / "errors.json")
    sampling.write_indices(path, [3, 40])
    it = _stream(source, "natural", upweight_file=path, factor=3)
    counts = np.bincount(_indices(it, (48 + 4) // 4), minlength=48)  # one epoch: 52 draws
    assert counts[3] == counts[40] == 3 and np.all(np.delete(counts, [3, 40]) == 1)


def test_sampling_errors_name_the_dataset_and_the_key(tmp_path):
    with pytest.raises(ValueError, match="dataset 'grouped'.*no label x habitat groups"):
        _stream(GroupSource(habitats=False))
    with pytest.raises(ValueError, match="data.sampling 'balanced'"):
        sampling.Sampling("balanced")
    sampling.write_indices(tmp_path / "bad.json", [48])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 48\) for dataset 'grouped'"):
        _stream(GroupSource(), "natural", upweight_file=str(tmp_path / "bad.json"), factor=2)
    config = config_utils.load_config("synthetic.py:size=tiny")
    config.data.sampling = "group_balanced"
    assert sampling.Sampling.from_config(config.data).mode == "group_balanced"


# ---------------------------------------------------------------------------------------------
# Group DRO


def _dro(eta, adjustment=0.0, counts=(30, 4, 2, 12)):
    config = config_utils.load_config("synthetic.py:size=tiny")
    config.loss.group_dro.update(eta=eta, adjustment=adjustment)
    return group_dro.GroupDRO.from_config(config, GroupSource(counts).info)


def test_group_dro_moves_weight_to_the_worst_group_by_the_update_rule():
    dro = _dro(eta=0.5, adjustment=2.0)
    losses = jnp.array([0.1, 0.3, 2.0, 2.2, 0.5])
    groups = jnp.array([0, 0, 2, 2, -1])  # groups 1 and 3 absent; habitat unknown: no group
    q = jnp.full(4, 0.25)
    loss, new_q = dro.loss(losses, groups, q)
    group_losses = np.array([0.2, 0.0, 2.1, 0.0])
    adjusted = group_losses + 2.0 / np.sqrt([30, 4, 2, 12])
    want = 0.25 * np.exp(0.5 * adjusted)
    want /= want.sum()
    np.testing.assert_allclose(new_q, want, rtol=1e-6)
    np.testing.assert_allclose(loss, group_losses @ want, rtol=1e-6)
    assert int(np.argmax(new_q)) == 2  # the worst group gains the most weight
    # The gradient weighs each example by q_g / n_g of its group (q held fixed).
    grads = jax.grad(lambda x: dro.loss(x, groups, q)[0])(losses)
    np.testing.assert_allclose(grads, [want[0] / 2, want[0] / 2, want[2] / 2, want[2] / 2, 0])


def test_group_dro_is_off_by_default_and_refuses_data_without_habitats():
    assert _dro(eta=0.0) is None
    config = config_utils.load_config("synthetic.py:size=tiny")
    config.loss.group_dro.eta = 0.1
    with pytest.raises(ValueError, match="dataset 'grouped' has none"):
        group_dro.initial_state(config, GroupSource(habitats=False).info)


def test_train_step_updates_group_weights_from_the_batch_groups(tmp_path):
    """One jitted train step: q' = normalise(q * exp(eta * L_g)) with L_g the batch's group
    losses at the initial parameters, the logged loss sum_g q'_g L_g, q kept in the state and
    its checkpoints."""
    from bgjax import checkpoint

    config = config_utils.load_config("synthetic.py:arch=vit,size=tiny")
    config.loss.group_dro.eta = 1.0
    config.data.sampling = "group_balanced"
    mesh = parallel.make_mesh(config.mesh)
    source = data_lib.get_source(config.data, "train")
    setup = train_state.make_setup(config, source.info, mesh)
    state = setup.init()
    batch = next(
        pipeline.build(
            source, batch_size=config.batch_size, image_size=config.data.image_size, train=True,
            seed=0, num_devices=mesh.size, sampling=sampling.Sampling.from_config(config.data),
        ).__iter__()
    )  # fmt: skip
    model = nnx.merge(setup.graphdef, state["params"], state["rest"])
    images, _ = masks.MaskSource().inputs(
        batch, source.info.mean, source.info.std, None, masked=False
    )
    logits = model(images, mask=None, train=True)
    example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    groups = batch["label"] * source.info.num_habitats + batch["habitat"]
    num_groups = source.info.num_classes * source.info.num_habitats
    group_losses = np.array(
        [example[groups == g].mean() if np.any(groups == g) else 0.0 for g in range(num_groups)]
    )
    want = np.exp(group_losses) / np.exp(group_losses).sum()

    step = train_step.jit_train_step(config, setup, source.info, mesh)
    new_state, metrics = step(state, pipeline.to_global(batch, mesh), None)
    np.testing.assert_allclose(parallel.fetch(new_state[group_dro.STATE_KEY]), want, rtol=1e-4)
    np.testing.assert_allclose(parallel.fetch(metrics)["loss"], group_losses @ want, rtol=1e-4)
    ckpt = checkpoint.Checkpointer(tmp_path, keep_best=0, async_save=False)
    ckpt.save(1, new_state)
    restored = ckpt.restore(1, setup.abstract)
    ckpt.close()
    np.testing.assert_allclose(parallel.fetch(restored[group_dro.STATE_KEY]), want, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Selection by validation worst-group accuracy


def _fake_rows(jobs, val_by_setting, rng):
    """aggregate rows for `jobs` with made-up metrics: a setting's validation worst group is
    `val_by_setting` plus 0.01 per seed index (equal settings tie); its test worst group is the
    reverse order, so selecting by test instead would pick another setting. Runs without
    evaluations (JTT's identification stage) are left out, as `aggregate.collect` does."""
    rows = []
    for job in (job for job in jobs if job.evals != ()):
        points = dict(job.points)
        val = val_by_setting[points.get("loss.group_dro.eta", points["method"])]
        test = dict(original=rng.uniform(0.6, 0.9), worst_group_accuracy=1.0 - val,
                    average_accuracy=rng.uniform(0.6, 0.9))  # fmt: skip
        rows.append(dict(
            run=job.name, model="convnext_atto", family="convnext", params=1e6,
            strategy="none", seed=int(points["seed"][4:]), points=points,
            metrics=dict(val=dict(worst_group_accuracy=val + 0.01 * int(points["seed"][4:])),
                         test=test, iid=dict(original=0.9, bg_gap=rng.uniform(0, 0.3))),
        ))  # fmt: skip
    return rows


def test_selection_picks_each_methods_best_validation_setting_and_reports_test_over_seeds(
    tmp_path,
):
    from bgjax import aggregate, sweep
    from bgjax import selection as selection_lib

    config = config_utils.load_config("sweeps/baselines.py")
    jobs = sweep.expand(config, root=str(tmp_path))
    sweep.write_manifest(str(tmp_path), config, jobs)
    val = {"erm": 0.1, "class_balanced": 0.2, "group_balanced": 0.5, "eta0.01": 0.3, "eta0.1": 0.6,
           "jtt": 0.4}  # fmt: skip
    rows = _fake_rows(jobs, val, np.random.default_rng(0))
    points = aggregate.load_points(tmp_path)
    assert all(points[r["run"]] == r["points"] for r in rows)

    # DFR copies of the ERM runs (`bgjax dfr --out ROOT/dfr-<run>`) form their own method.
    for row in [r for r in rows if r["points"]["method"] == "erm"]:
        (tmp_path / f"dfr-{row['run']}").mkdir()
        (tmp_path / f"dfr-{row['run']}" / "dfr.json").write_text(
            json.dumps({"source": str(tmp_path / row["run"])})
        )
        assert aggregate.dfr_source(tmp_path / f"dfr-{row['run']}") == row["run"]
        rows.append(dict(row, run=f"dfr-{row['run']}", dfr_of=row["run"]))
    selection = selection_lib.Selection.from_manifest(tmp_path)
    paths = aggregate.write_outputs(tmp_path, rows, selection)
    chosen = {m["method"]: m for m in json.loads(Path(paths["selection"]).read_text())["methods"]}
    methods = ["erm", "class_balanced", "group_balanced", "group_dro", "jtt", "dfr+erm"]
    assert list(chosen) == methods and chosen["dfr+erm"]["runs"][0] == "dfr-erm-seed0"
    # JTT's four settings tie on validation: the first in the grid is kept.
    assert chosen["jtt"]["setting"] == {"identification": "T100", "data.upweight.factor": "factor5"}
    dro = chosen["group_dro"]
    assert dro["setting"] == {"loss.group_dro.eta": "eta0.1"} and dro["settings_compared"] == 2
    runs = [r for r in rows if r["run"].startswith("group_dro-eta0.1-")]
    assert dro["runs"] == [r["run"] for r in runs] and dro["seeds"] == [0, 1, 2]
    want = [r["metrics"]["val"]["worst_group_accuracy"] for r in runs]
    assert dro["selection_value"] == pytest.approx(np.mean(want))
    for name, (evaluation, metric) in (("test:average_accuracy", ("test", "average_accuracy")),
                                       ("iid:bg_gap", ("iid", "bg_gap"))):  # fmt: skip
        values = [r["metrics"][evaluation][metric] for r in runs]
        assert dro["report"][name]["mean"] == pytest.approx(np.mean(values))
        assert dro["report"][name]["std"] == pytest.approx(np.std(values, ddof=1))
        assert dro["report"][name]["n"] == 3
    assert chosen["erm"]["report"]["test:worst_group_accuracy"]["mean"] == pytest.approx(0.9)
    table = Path(paths["md"]).read_text()
    assert "| group_dro | eta0.1 | 3 |" in table
    # Selecting by the minimum (e.g. a loss) takes the other setting.
    low = selection_lib.select(rows, dataclasses.replace(selection, mode="min"))
    assert {m["method"]: m["setting"] for m in low}["group_dro"] == {
        "loss.group_dro.eta": "eta0.01"
    }


def test_selection_spec_errors_are_caught_when_the_sweep_expands():
    from bgjax import selection, sweep

    config = config_utils.load_config("sweeps/baselines.py:quick=True")
    config.selection.metric = "worst_group_accuracy"
    with pytest.raises(ValueError, match="not of the form <eval>:<metric>"):
        sweep.expand(config)
    with pytest.raises(ValueError, match=r"unknown keys \['metrics'\]"):
        selection.Selection.parse({"metrics": "val:original"})


# ---------------------------------------------------------------------------------------------
# JTT


def test_jtt_upweights_the_identification_runs_training_errors(tmp_path):
    """Stage 2 names stage 1's run in data.upweight.errors_of: the error set is the training
    examples its last checkpoint misclassifies (checked with a plain forward pass; here an
    untrained model's checkpoint), cached in stage 1's workdir."""
    from bgjax import workdir as workdir_lib
    from bgjax.tasks import jtt

    identify = tmp_path / "identify"
    config, source = _untrained_run(identify)
    run = workdir_lib.restore(identify)
    examples = pipeline.load_examples(source, "original", image_size=32, seed=0)
    images = pipeline.normalize(examples["image"], run.mean, run.std)
    wrong = np.flatnonzero(np.argmax(run.model(images, None), -1) != examples["label"])
    assert 0 < len(wrong) < len(source)

    config.data.upweight.update(errors_of=str(identify), factor=3)
    plan = jtt.training_sampling(config.data)
    assert plan.upweight == tuple(wrong) and plan.upweight_factor == 3
    saved = json.loads((identify / jtt.ERROR_SET_FILE).read_text())
    assert saved["step"] == 2 and saved["indices"] == wrong.tolist()
    config.data.upweight.update(errors_of="", file=str(identify / jtt.ERROR_SET_FILE))
    assert jtt.training_sampling(config.data).upweight == tuple(wrong)  # the cache as a file
    config.data.upweight.errors_of = str(identify)
    with pytest.raises(ValueError, match="give file or errors_of, not both"):
        jtt.training_sampling(config.data)


# ---------------------------------------------------------------------------------------------
# DFR


def test_softmax_l1_fit_meets_the_optimality_conditions():
    from bgjax import dfr

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=120) > 0).astype(int)
    c = 0.05
    w, b = dfr.fit_softmax_l1(x, y, 2, c, steps=3000)
    logits = x @ w + b
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    grad = x.T @ (probs - np.eye(2)[y])  # of the summed cross-entropy
    zero = np.abs(w) < 1e-6
    assert zero.any() and not zero.all()  # the L1 penalty drops the noise features
    assert np.all(np.abs(grad[zero]) <= 1 / c + 1e-2)
    np.testing.assert_allclose(grad[~zero], -np.sign(w[~zero]) / c, atol=1e-2)
    np.testing.assert_allclose((probs - np.eye(2)[y]).sum(0), 0, atol=1e-2)  # free bias
    assert np.mean(np.argmax(logits, 1) == y) > 0.85


def test_dfr_retrains_the_head_on_balanced_validation_data_into_a_new_run(tmp_path):
    from bgjax import dfr
    from bgjax import workdir as workdir_lib

    config, _ = _untrained_run(tmp_path / "run", val_size=160)
    record = dfr.run_dfr(str(tmp_path / "run"), str(tmp_path / "dfr"), c_grid=(1.0, 0.1))
    assert record["c"] in (1.0, 0.1) and record["fit_examples"] < record["tune_examples"]
    cached = list((tmp_path / "run" / "dfr").glob("features_val_2.npz"))
    assert len(cached) == 1

    original, retrained = (
        workdir_lib.restore(tmp_path / "run"),
        workdir_lib.restore(tmp_path / "dfr"),
    )
    assert retrained.step == 2 and json.loads((tmp_path / "dfr" / "dfr.json").read_text())["c"]
    with np.load(cached[0]) as saved:
        features = saved["features"]
    head_old, head_new = original.model.head, retrained.model.head
    np.testing.assert_array_equal(retrained.model.patch_embed.proj.kernel.value,
                                  original.model.patch_embed.proj.kernel.value)  # fmt: skip
    assert not np.allclose(head_old.kernel.value, head_new.kernel.value)
    # The new run's logits are the fitted head on the cached features.
    source = data_lib.get_source(config.data, "val")
    examples = pipeline.load_examples(source, "original", image_size=32, seed=0)
    images = pipeline.normalize(examples["image"], retrained.mean, retrained.std)
    np.testing.assert_allclose(
        retrained.model(images, None), head_new(jnp.asarray(features)), rtol=1e-4, atol=1e-4
    )
    # Features are read back, not extracted again.
    mtime = cached[0].stat().st_mtime
    again = dfr.cached_features(original, "val", batch_size=16)
    np.testing.assert_array_equal(again["features"], features)
    assert cached[0].stat().st_mtime == mtime
