"""Shared pieces of the training benchmarks: the machine, timing, the real train step, output.

Timing: every measured call is synchronous (the caller blocks on its result); we keep the
wall-clock AND the process CPU time (user + system, all threads) of each call and report the
median. On a shared machine the wall clock counts the time other processes held the cores;
`cpu_img_s` = images x threads / CPU seconds is the wall-clock throughput the same work would
have on `threads` idle cores, which is what comparisons are made on when the load is high.

Nothing here imports JAX at module level: `limit_threads` must run before JAX starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from a checkout without install
    sys.path.insert(0, str(REPO))

# "tiny_<family>": the config_utils test models, for smoke runs of every benchmark.
TINY_PREFIX = "tiny_"


# ---------------------------------------------------------------------------------------------
# Machine


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def limit_threads(threads: int | None) -> int:
    """Pin this process to `threads` cores (XLA's CPU thread pool sizes itself from the
    affinity when JAX starts, so call this before importing JAX). Returns the thread count."""
    cores = sorted(os.sched_getaffinity(0))
    if threads is None or threads >= len(cores):
        return len(cores)
    if threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    if "jax" in sys.modules:
        print(f"warning: JAX already imported; --threads {threads} may not limit XLA's pool")
    os.sched_setaffinity(0, cores[:threads])
    return threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a result needs to be compared: cores, CPU, load, library versions, devices."""
    import jax

    info = dict(
        date=datetime.date.today().isoformat(),
        nproc=os.cpu_count(),
        affinity_cores=available_cores(),
        cpu=cpu_model(),
        load_avg_1m=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        device_count=jax.device_count(),
    )
    for name in ("flax", "torch", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = module.__version__
    return info


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timings:
    """Per-call wall-clock and process-CPU seconds of a repeated, synchronous call."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    page_faults: list[int] = dataclasses.field(default_factory=list)

    def add(self, wall: float, cpu: float, page_faults: int) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.page_faults.append(page_faults)

    def summary(self, images_per_call: int, threads: int) -> dict[str, float]:
        """Median step times -> img/s (wall) and img/s at `threads` idle cores (CPU time)."""
        wall, cpu = statistics.median(self.wall), statistics.median(self.cpu)
        return dict(
            steps=len(self.wall),
            step_s=wall,
            step_cpu_s=cpu,
            img_s=images_per_call / wall,
            cpu_img_s=images_per_call * threads / cpu if cpu > 0 else float("nan"),
            cpu_util=cpu / wall,  # cores this process kept busy on average
            # Minor page faults: fresh memory touched per call (hostmem.py explains the cost).
            page_faults=statistics.median(self.page_faults) if self.page_faults else 0,
            wall_s_each=list(self.wall),
        )


def time_call(fn: Callable[[], Any], timings: Timings) -> Any:
    """Run `fn()` (which must block until its work is done) and record its times."""
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    timings.add(wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    return result


# ---------------------------------------------------------------------------------------------
# The real train step (bgjax.train), on synthetic uint8 batches


def train_config(
    arch: str,
    *,
    batch: int,
    size: int,
    num_classes: int = 9,
    dtype: str = "float32",
    remat: str | bool = "none",
    grad_accum: int = 1,
    total_steps: int = 10_000,
    **model_overrides: Any,
):
    """A training config for `arch` (a bgjax model name or `tiny_convnext` / `tiny_vit`):
    AdamW without clipping or EMA, no augmentation or batch mixing, fp32 parameters."""
    from bgjax import config_utils

    c = config_utils.base_config()
    model = model_kwargs(arch, size)
    c.model.name = model.pop("name")
    c.model.update(model)
    c.model.update(model_overrides)
    c.model.dtype = dtype
    c.model.remat = remat  # a bgjax.models.stacking policy name (or True / False)
    c.data.name = "benchmark"
    c.data.image_size = size
    c.data.num_classes = num_classes
    c.batch_size = batch
    c.total_steps = total_steps
    c.optimizer.warmup_steps = 1
    c.optimizer.clip_norm = 0.0  # the torch reference does not clip either
    c.optimizer.grad_accum = grad_accum
    return c


def model_kwargs(arch: str, size: int) -> dict[str, Any]:
    """`name` + constructor overrides of `arch`, as understood by bgjax AND timm."""
    from bgjax import config_utils

    if arch.startswith(TINY_PREFIX):
        family = arch[len(TINY_PREFIX) :]
        if family not in config_utils.TINY_MODELS:
            known = ", ".join(TINY_PREFIX + f for f in config_utils.TINY_MODELS)
            raise ValueError(f"unknown tiny arch {arch!r}; known: {known}")
        kwargs = dict(config_utils.TINY_MODELS[family])
    else:
        kwargs = dict(name=arch)
    if kwargs["name"].startswith("vit_"):
        kwargs["img_size"] = size  # position embedding for this resolution
    return kwargs


def timm_model(arch: str, size: int, num_classes: int):
    """(timm's model of `arch` at `size` px, randomly initialised; timm's version), imported
    through the tests' shim for this project's CPU torch wheel (tests/timm_compat.py)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from timm_compat import import_timm

    timm = import_timm()
    kwargs = model_kwargs(arch, size)
    model = timm.create_model(
        kwargs.pop("name"), pretrained=False, num_classes=num_classes, **kwargs
    )
    return model, timm.__version__


def benchmark_info(num_classes: int):
    """A DatasetInfo for generated batches: `num_classes` classes, ImageNet normalisation."""
    import numpy as np

    from bgjax.data import DatasetInfo

    names = tuple(f"class_{i}" for i in range(num_classes))
    return DatasetInfo("benchmark", "train", names, np.zeros((0,), np.int32))


def host_batches(batch: int, size: int, num_classes: int, count: int = 2, seed: int = 0):
    """`count` distinct random host batches in the pipeline's layout (uint8 images)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        dict(
            image=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            mask=(rng.random((batch, size, size)) < 0.5).astype(np.uint8),
            label=rng.integers(0, num_classes, (batch,), dtype=np.int32),
            habitat=np.full((batch,), -1, np.int32),
            valid=np.ones((batch,), bool),
        )
        for _ in range(count)
    ]


@dataclasses.dataclass
class TrainStep:
    """The trainer's compiled step with its initial state: `state, metrics = step(state, batch)`."""

    config: Any
    mesh: Any
    step: Callable  # the compiled executable
    jitted: Callable  # the same step as `jax.jit` returns it (compiles on first call)
    state: dict
    compile_s: float
    flops: float | None  # per step, XLA's cost analysis (None when the backend has none)


def build_train_step(config, mesh) -> TrainStep:
    """bgjax.train's setup + train step, jitted by `train_step.jit_train_step` as `train.train` runs
    it (state donated, ground-truth masks), compiled ahead of time so that its compile time and
    FLOPs are known before the first step."""
    import jax

    from bgjax import train_state, train_step

    info = benchmark_info(config.data.num_classes)
    setup = train_state.make_setup(config, info, mesh)
    jitted = train_step.jit_train_step(config, setup, info, mesh)
    example = host_batches(config.batch_size, config.data.image_size, 1, count=1)[0]
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example)
    start = time.perf_counter()
    compiled = jitted.lower(setup.abstract, abstract_batch, None).compile()  # no mask params
    compile_s = time.perf_counter() - start
    step = lambda state, batch: compiled(state, batch, None)
    return TrainStep(config, mesh, step, jitted, setup.init(), compile_s, xla_flops(compiled))


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable by XLA's cost analysis (None if the backend has none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, Sequence) and not isinstance(cost, dict):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def device_batches(batches: Sequence[dict], mesh, prefetch: int = 2) -> Iterator[dict]:
    """Endless global device batches cycling through `batches`, `prefetch` transfers ahead:
    the next batch's host->device copy overlaps the running step (double buffering)."""
    import collections
    import itertools

    from bgjax.data import pipeline

    queue: collections.deque = collections.deque()
    for host in itertools.cycle(batches):
        queue.append(pipeline.to_global(host, mesh))
        if len(queue) > prefetch - 1:
            yield queue.popleft()


# ---------------------------------------------------------------------------------------------
# Output


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "n/a" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    keys = ("date", "cpu", "nproc", "affinity_cores", "load_avg_1m", "backend", "device_kind")
    versions = ", ".join(f"{k} {info[k]}" for k in ("jax", "flax", "torch", "timm") if k in info)
    return "; ".join(f"{k}={info[k]}" for k in keys) + f"; {versions}"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def prepare_process(*, sync_cpu_dispatch: bool = False) -> None:
    """A benchmark script's first call (before JAX starts): host memory as `bgjax` sets it up, so
    steps are timed as the trainer runs them; `sync_cpu_dispatch` as `BGJAX_KEEP_HEAP=sync` (big
    models on a CPU). Scripts call it under `__main__` only: tests run their `main` in-process."""
    from bgjax import hostmem

    hostmem.keep_freed_memory()
    if sync_cpu_dispatch:
        hostmem.sync_cpu_dispatch()


def main(args, run: Callable[[Any], dict], report: Callable[[dict], str]) -> dict:
    """Every benchmark's entry point: run, print the Markdown report, write `--json`."""
    result = run(args)
    print(report(result), flush=True)
    write_json(args.json, result)
    return result
