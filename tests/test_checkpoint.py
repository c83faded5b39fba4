"""Checkpointer: resharding restore, Grain iterator state, torn steps, retention, preemption."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bgjax import checkpoint, parallel


def _iterator():
    return iter(grain.MapDataset.range(40).seed(3).shuffle().batch(4).to_iter_dataset())


def _state(mesh):
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return {
        "w": shard(jnp.arange(32.0).reshape(8, 4), P("fsdp")),
        "b": shard(jnp.arange(4.0), P()),
        "step": shard(jnp.int32(7), P()),
        "rng": jax.random.key_data(jax.random.key(5)),
    }


def _abstract(state, mesh, specs):
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
        for k, v in state.items()
    }


def test_restore_onto_a_smaller_mesh_and_resume_the_iterator(tmp_path):
    mesh4 = parallel.make_mesh([("data", 1), ("fsdp", 4)])
    mesh2 = parallel.make_mesh([("data", 1), ("fsdp", 2)], devices=jax.devices()[:2])
    state = _state(mesh4)
    it = _iterator()
    next(it), next(it)
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(2, state, it)
    saver.close()
    expected_next = next(it)

    specs = {"w": P("fsdp"), "b": P(), "step": P(), "rng": P()}
    fresh = _iterator()
    loader = checkpoint.Checkpointer(tmp_path)
    assert loader.latest_step() == 2
    restored = loader.restore(2, _abstract(state, mesh2, specs), fresh)
    loader.close()
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))
    assert restored["w"].sharding.mesh.devices.size == 2
    assert restored["w"].sharding.spec == P("fsdp")
    np.testing.assert_array_equal(next(fresh), expected_next)


def test_torn_step_is_skipped_with_a_message(tmp_path, capsys):
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    state = _state(mesh)
    saver = checkpoint.Checkpointer(tmp_path, async_save=False)
    saver.save(1, state)
    saver.save(2, {**state, "b": state["b"] + 1})
    saver.close()
    assert checkpoint.is_finalized(tmp_path / "2")
    # Tear step 2 as an interrupted copy would: its finalisation records are gone.
    (tmp_path / "2" / "commit_success.txt").unlink()
    (tmp_path / "2" / "_CHECKPOINT_METADATA").unlink()
    assert not checkpoint.is_finalized(tmp_path / "2")
    (tmp_path / "3.orbax-checkpoint-tmp-1234").mkdir()  # an unfinished async save

    reader = checkpoint.Checkpointer(tmp_path, read_only=True)  # evaluation: moves nothing
    assert reader.latest_step() == 1 and (tmp_path / "2").is_dir()
    reader.close()

    loader = checkpoint.Checkpointer(tmp_path)
    assert "torn checkpoint" in capsys.readouterr().out
    assert loader.latest_step() == 1
    assert (tmp_path / "2.torn").is_dir()
    specs = {"w": P(), "b": P(), "step": P(), "rng": P()}
    restored = loader.restore(1, _abstract(state, mesh, specs))
    np.testing.assert_array_equal(np.asarray(restored["b"]), np.asarray(state["b"]))
    # Training continues past the torn step: saving step 2 again must work.
    loader.save(2, state)
    loader.close()
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [1, 2]


def test_retention_keeps_latest_and_best(tmp_path):
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    state = {"x": jax.device_put(jnp.zeros(3), parallel.replicated(mesh))}
    ckpt = checkpoint.Checkpointer(
        tmp_path, keep=2, keep_best=1, best_metric="acc", best_mode="max", async_save=False
    )
    for step, acc in zip(range(1, 6), [0.3, 0.9, 0.5, 0.4, 0.2]):
        ckpt.save(step, state, metrics={"acc": acc})
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    ckpt.save(6, state)  # no metric (a non-eval step): kept as one of the latest
    assert ckpt.all_steps() == [2, 5, 6]
    ckpt.close()


def test_partial_restore_reads_only_named_entries(tmp_path):
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    state = _state(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state)
    wanted = _abstract({"w": state["w"]}, mesh, {"w": P()})
    restored = ckpt.restore_partial(1, wanted)
    ckpt.close()
    assert set(restored) == {"w"}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))


def test_sigterm_requests_a_stop_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionWatcher() as watcher:
        assert not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("mode", ["best", "worst"])
def test_bad_best_mode_is_an_error(tmp_path, mode):
    if mode == "best":
        checkpoint.Checkpointer(tmp_path, best_mode="max").close()
    else:
        with pytest.raises(ValueError, match="best_mode"):
            checkpoint.Checkpointer(tmp_path, best_mode="worst")
