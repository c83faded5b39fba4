"""Devices, meshes and shardings: the ONE parallel path (a named mesh + `jax.jit`, no pmap).

    config.mesh = [("data", -1), ("fsdp", 1)]      # -1: all remaining devices

Every process sees the same global mesh over all devices. The batch dimension is sharded over
ALL mesh axes (data parallel over "data" x "fsdp"); parameters are sharded along "fsdp" as the
models' partitioning metadata asks (`nnx.with_partitioning(..., (..., "fsdp"))`), dropping an
axis whose mesh size does not divide the dimension. Optimizer state and EMA copies are sharded
like the parameters they mirror. XLA inserts the all-gathers / reduce-scatters (ZeRO-3 style).

Multi-host: `initialize_distributed()` starts `jax.distributed` before anything touches the
devices, from explicit arguments, the BGJAX_* environment, or the cluster's own (Slurm, TPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# ---------------------------------------------------------------------------------------------
# Processes


def _detected_cluster() -> str | None:
    """The multi-process cluster JAX can auto-configure, or None for a single process."""
    if os.environ.get("BGJAX_DISTRIBUTED", "") not in ("", "0"):  # set by launch/tpu_pod.sh
        return "any"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU pod slice
        return "tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize` when this is one of several processes; else nothing.

    Explicit arguments win, then the environment BGJAX_COORDINATOR / BGJAX_NUM_PROCESSES /
    BGJAX_PROCESS_ID (what `launch/local.sh` and `launch/slurm.sbatch` set), then JAX's own
    cluster detection when the environment shows a cluster (Slurm with several tasks, a TPU pod,
    MPI) or BGJAX_DISTRIBUTED=1 asks for it (`launch/tpu_pod.sh`).
    Must run before the first JAX computation or device query.
    """
    env = os.environ
    coordinator = coordinator or env.get("BGJAX_COORDINATOR") or None
    if num_processes is None and env.get("BGJAX_NUM_PROCESSES"):
        num_processes = int(env["BGJAX_NUM_PROCESSES"])
    if process_id is None and env.get("BGJAX_PROCESS_ID"):
        process_id = int(env["BGJAX_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator {coordinator!r} given without num_processes/process_id "
                "(set BGJAX_NUM_PROCESSES and BGJAX_PROCESS_ID, or the matching flags)"
            )
        if num_processes == 1:
            return
        logging.info(
            "jax.distributed: process %d/%d via %s", process_id, num_processes, coordinator
        )
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif cluster := _detected_cluster():
        logging.info("jax.distributed: auto-detected %s cluster", cluster)
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Meshes


def make_mesh(axes: Sequence[Sequence[Any]], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from [(name, size), ...]; one size may be -1 (all remaining devices).

    All axes are `AxisType.Auto`: the compiler propagates shardings from the pinned inputs and
    outputs of the step (jax 0.10 defaults to Explicit axes, which would need annotations in
    every layer).
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(a[0]) for a in axes)
    sizes = [int(a[1]) for a in axes]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mesh axis names must be unique and non-empty, got {names}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh {list(axes)}: {len(devices)} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dim 0 split over every mesh axis (the layout `pipeline.to_global` produces)."""
    return NamedSharding(mesh, P(mesh.axis_names))


# ---------------------------------------------------------------------------------------------
# Parameter shardings


# Tensors with fewer elements stay replicated under FSDP: gathering them costs a collective's
# latency for nothing (biases, norms, ConvNeXt's 7x7 depthwise kernels), as in big_vision's
# and MaxText's FSDP rules.
FSDP_MIN_SIZE = 2**16


def fit_spec(spec: P | None, shape: Sequence[int], mesh: Mesh, min_size: int = 0) -> P:
    """`spec` with every axis the mesh lacks or cannot divide the dim by replaced by None; a
    tensor of fewer than `min_size` elements is replicated."""
    if spec is None or math.prod(shape) < min_size:
        return P()
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        names = tuple(n for n in names if n in mesh.shape)
        size = math.prod(mesh.shape[n] for n in names)
        keep = names and size > 1 and dim % size == 0
        fitted.append((names[0] if len(names) == 1 else names) if keep else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedShardings for an (abstract) nnx.State, from its partitioning metadata; tensors of
    fewer than `min_size` elements replicated (config.fsdp_min_size)."""
    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, fit_spec(spec, x.shape, mesh, min_size)),
        abstract_state,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def _path_key(path: Sequence[Any]) -> tuple[str, ...]:
    """A key path as plain strings, without the `.value` of nnx Variables."""
    keys = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        if isinstance(entry, jax.tree_util.GetAttrKey) and key == "value":
            continue
        keys.append(str(key))
    return tuple(keys)


def mirror_shardings(tree: Any, reference: Any, reference_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `tree` (optimizer state, EMA, ...) that mirror `reference` (the params).

    A leaf of `tree` whose key path ENDS with a reference leaf's path and has that leaf's shape
    (Adam's mu/nu, MultiSteps' accumulators, masked / multi_transform inner states) gets the
    same sharding; every other leaf (counts, scalars) is replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(reference_shardings)
    ):
        by_path[_path_key(path)] = (tuple(leaf.shape), sharding)

    def pick(path, leaf):
        keys, shape = _path_key(path), tuple(np.shape(leaf))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


# ---------------------------------------------------------------------------------------------
# Host values


def fetch(tree: Any) -> Any:
    """Host NumPy copies of fully replicated global arrays (metrics), valid on every process."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
