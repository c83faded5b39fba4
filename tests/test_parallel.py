"""Meshes, parameter / optimizer-state shardings, multi-process start-up."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax import optim, parallel


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(
            nnx.initializers.lecun_normal(), (None, "fsdp"), eager_sharding=False
        )
        self.fc = nnx.Linear(6, 8, kernel_init=init, rngs=rngs)  # 8 divides by 2 and 4
        odd = nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("fsdp", None), eager_sharding=False
        )
        self.proj = nnx.Linear(6, 8, kernel_init=odd, rngs=rngs)  # 6 does not divide by 4
        self.head = nnx.Linear(8, 3, rngs=rngs)


def test_make_mesh_fills_in_minus_one_and_uses_auto_axes():
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert parallel.make_mesh([["data", -1]], devices=jax.devices()[:1]).size == 1


@pytest.mark.parametrize(
    "axes, message",
    [
        ([("data", 3), ("fsdp", 1)], "needs 3 devices"),
        ([("data", -1), ("fsdp", 3)], "not divisible by 3"),
        ([("data", -1), ("fsdp", -1)], "at most one -1"),
        ([("data", 2), ("data", 2)], "unique"),
    ],
)
def test_make_mesh_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(axes)


def test_fit_spec_drops_axes_that_do_not_divide_or_do_not_exist():
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 4)])
    assert parallel.fit_spec(P(None, "fsdp"), (6, 8), mesh) == P(None, "fsdp")
    assert parallel.fit_spec(P("fsdp", None), (6, 8), mesh) == P()
    assert parallel.fit_spec(P("model"), (8,), mesh) == P()
    assert parallel.fit_spec(P("data"), (8,), mesh) == P()  # size-1 axes are not worth naming
    assert parallel.fit_spec(None, (8,), mesh) == P()


def test_state_and_optimizer_shardings_follow_the_metadata():
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 4)])
    params = nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))), nnx.Param)
    shardings = parallel.state_shardings(params, mesh, min_size=0)
    assert shardings["fc"]["kernel"].value.spec == P(None, "fsdp")
    assert shardings["proj"]["kernel"].value.spec == P()  # 6 rows cannot split 4 ways
    assert shardings["head"]["kernel"].value.spec == P()

    tx, _ = optim.make(_opt_cfg(head_lr_mult=10.0), total_steps=10)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = parallel.mirror_shardings(opt_state, params, shardings, mesh)
    fsdp_leaves = [
        (path, s)
        for path, s in jax.tree_util.tree_leaves_with_path(opt_shardings)
        if s.spec == P(None, "fsdp")
    ]
    # Adam's mu and nu of fc.kernel, inside the backbone group of multi_transform.
    assert len(fsdp_leaves) == 2, fsdp_leaves
    counts = [s for p, s in jax.tree_util.tree_leaves_with_path(opt_shardings) if "count" in str(p)]
    assert counts and all(s.spec == P() for s in counts)


def _opt_cfg(**kw):
    import ml_collections

    base = dict(lr=1e-2, wd=0.1, warmup_steps=2, clip_norm=1.0)
    return ml_collections.ConfigDict({**base, **kw})


def test_weight_decay_and_head_groups():
    params = {
        "blocks": {"0": {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}},
        "pos_embed": jnp.ones((1, 3, 2)),
        "gamma": jnp.ones(2),
        "head": {"kernel": jnp.ones((2, 2))},
    }
    decays = jax.tree_util.tree_map_with_path(optim.decays, params)
    assert decays == {
        "blocks": {"0": {"mlp": {"kernel": True, "bias": False}}},
        "pos_embed": False,
        "gamma": False,
        "head": {"kernel": True},
    }
    tx, schedule = optim.make(_opt_cfg(head_lr_mult=100.0, clip_norm=0.0, wd=0.0), 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # After 1 step Adam's update is ~lr(step 0) = 0 during warm-up; take step 1 instead.
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    ratio = updates["head"]["kernel"][0, 0] / updates["blocks"]["0"]["mlp"]["kernel"][0, 0]
    assert ratio == pytest.approx(100.0, rel=1e-4)
    assert float(schedule(2)) == pytest.approx(1e-2)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in (
        "BGJAX_COORDINATOR",
        "SLURM_NTASKS",
        "TPU_WORKER_HOSTNAMES",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    parallel.initialize_distributed()
    assert jax.process_count() == 1
    monkeypatch.setenv("BGJAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="BGJAX_NUM_PROCESSES"):
        parallel.initialize_distributed()
