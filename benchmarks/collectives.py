"""Bytes each kind of collective moves per train step, from the compiled program, next to the
analytic minimum; FLOPs next to the model's count. No step runs: the trainer's step is lowered
from shapes and compiled for a mesh of `--devices` devices (simulated CPU devices when there is
no accelerator).

    python benchmarks/collectives.py --arch vit_small_patch16_224 --devices 4 --batch 8 --size 64
    python benchmarks/collectives.py --arch convnext_tiny --devices 4 --mesh fsdp --dtype bfloat16
    python benchmarks/collectives.py --arch tiny_vit --devices 2 --size 32 --grad-accum 2

Per device, ring algorithms: an all-reduce of S bytes moves 2 (n-1)/n S, an all-gather to S or
a reduce-scatter from S moves (n-1)/n S, a collective-permute S, an all-to-all (n-1)/n S. A
collective inside a loop counts once per iteration (XLA's known trip count). Minimum per step:
data parallel, one all-reduce of the fp32 gradients (2 (n-1)/n x gradient bytes); FSDP, the
weights gathered for the forward and again for the backward pass in the compute dtype and the
gradients reduce-scattered ((n-1)/n x (2 x weight bytes + gradient bytes)).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path
import train_throughput

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes moved per device, as a multiple of the collective's buffers, ring algorithms.
RING_FACTOR = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1,
               "pred": 1, "s64": 8, "u64": 8}  # fmt: skip
COLUMNS = ("kind", "count", "count_in_loops", "mbytes_per_device", "min_mbytes_per_device")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_small_patch16_224", help="model name, or tiny_vit/...")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--mesh", default="data", choices=("data", "fsdp"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Compiled HLO text


def _total_bytes(types: str) -> int:
    """Bytes of all arrays in an HLO type list such as `(f32[16,48]{1,0}, bf16[3])`."""
    return sum(
        DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", types)
    )


def group_size(line: str, devices: int) -> int:
    """Devices in each replica group of a collective instruction (the formats XLA prints)."""
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", match[2]))
    if match := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(match[2])
    if match := re.search(r"replica_groups=\{\{([\d,]+)\}", line):
        return len(match[1].split(","))
    return devices  # collective-permute: pairs, not groups


def computations(hlo: str) -> dict[str, str]:
    """Compiled HLO text -> {computation name: its text}."""
    named = {}
    for part in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ )", hlo):
        if match := re.match(r"(?:ENTRY )?%([\w.\-]+) ", part):
            named[match[1]] = part
    return named


def loop_multipliers(hlo: str) -> dict[str, int]:
    """{computation: times it runs per step} for while bodies (and what they call), from XLA's
    known trip counts; computations not listed run once."""
    comps = computations(hlo)
    times: dict[str, int] = {}

    def mark(name: str, count: int, seen: set) -> None:
        if name in seen or name not in comps:
            return
        seen.add(name)
        times[name] = max(times.get(name, 1), count)
        for called in re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)", comps[name]
        ):
            mark(called, count, seen)

    for line in hlo.splitlines():
        if match := re.search(r"\bwhile\(.*?body=%([\w.\-]+)", line):
            trips = re.search(r'known_trip_count"?:\{"n":"(\d+)"', line)
            mark(match[1], int(trips[1]) if trips else 1, set())
    return times


def collective_bytes(hlo: str, devices: int) -> dict[str, dict[str, float]]:
    """{kind: {count, count_in_loops, bytes}} per device per step, ring model."""
    found: dict[str, dict[str, float]] = defaultdict(lambda: dict(count=0, in_loops=0, bytes=0))
    times = loop_multipliers(hlo)
    for name, text in computations(hlo).items():
        runs = times.get(name, 1)
        for line in text.splitlines():
            match = re.search(r"=\s*(.*?)\s(" + "|".join(KINDS) + r")(?:-start)?\(", line)
            if match is None:
                continue
            types, kind = match[1], match[2]
            n = group_size(line, devices)
            if n <= 1:
                continue
            # all-gather: the gathered (output) buffer; reduce-scatter: its input, n outputs.
            size = _total_bytes(types)
            if kind == "reduce-scatter":
                size *= n
            entry = found[kind]
            entry["count"] += runs
            entry["in_loops"] += runs if name in times else 0
            entry["bytes"] += runs * RING_FACTOR[kind](n) * size
    return dict(found)


# ---------------------------------------------------------------------------------------------
# The step


def analytic_minimum(args, param_count: int) -> dict[str, float]:
    """Minimum bytes per device per step by collective kind (see the module docstring)."""
    n = args.devices
    grad_bytes = 4 * param_count
    if n == 1:
        return {}
    if args.mesh == "data":
        return {"all-reduce": 2 * (n - 1) / n * grad_bytes}
    weight_bytes = (2 if args.dtype == "bfloat16" else 4) * param_count
    return {
        "all-gather": (n - 1) / n * 2 * weight_bytes,
        "reduce-scatter": (n - 1) / n * grad_bytes,
    }


def run(args) -> dict:
    import jax

    from bgjax import parallel, train_state, train_step

    available = jax.devices()
    if args.devices > len(available):
        raise SystemExit(f"--devices {args.devices}: {len(available)} devices here")
    axes = [("data", args.devices), ("fsdp", 1)]
    if args.mesh == "fsdp":
        axes = [("data", 1), ("fsdp", args.devices)]
    mesh = parallel.make_mesh(axes, devices=available[: args.devices])
    config = common.train_config(
        args.arch, batch=args.batch, size=args.size, num_classes=args.classes, dtype=args.dtype,
        grad_accum=args.grad_accum, kernels="xla",
    )  # fmt: skip
    info = common.benchmark_info(args.classes)
    setup = train_state.make_setup(config, info, mesh)
    example = common.host_batches(args.batch, args.size, 1, count=1)[0]
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example)
    jitted = train_step.jit_train_step(config, setup, info, mesh)
    compiled = jitted.lower(setup.abstract, batch, None).compile()
    hlo = compiled.as_text()

    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract["params"]))
    measured = collective_bytes(hlo, args.devices)
    minimum = analytic_minimum(args, param_count)
    rows = [
        dict(
            kind=kind,
            count=measured.get(kind, {}).get("count", 0),
            count_in_loops=measured.get(kind, {}).get("in_loops", 0),
            mbytes_per_device=measured.get(kind, {}).get("bytes", 0) / 1e6,
            min_mbytes_per_device=minimum.get(kind, 0) / 1e6,
        )
        for kind in KINDS
        if kind in measured or kind in minimum
    ]
    model_flops = train_throughput.model_flops_per_image(config)
    return dict(
        benchmark="collectives",
        args=vars(args),
        params=param_count,
        flops_step_xla_device=common.xla_flops(compiled),
        flops_step_model_device=None
        if model_flops is None
        else model_flops * args.batch / args.devices,
        machine=common.machine_info(),
        rows=rows,
    )


def report(result: dict) -> str:
    a = result["args"]
    return (
        f"### collectives per step: {a['arch']} {a['dtype']} batch {a['batch']} at {a['size']} px,"
        f" {a['mesh']} mesh of {a['devices']}, grad_accum {a['grad_accum']}\n\n"
        f"{common.markdown_table(result['rows'], COLUMNS)}\n\n"
        f"parameters {result['params']:,}; FLOPs per device per step: XLA "
        f"{common.fmt(result['flops_step_xla_device'])}, model (6 x MACs / devices) "
        f"{common.fmt(result['flops_step_model_device'])}\n{common.machine_line(result['machine'])}"
    )


def simulate_devices(count: int) -> None:
    """Ask XLA:CPU for `count` devices (before JAX starts), unless XLA_FLAGS already does."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    simulate_devices(parse_args().devices)
    common.prepare_process()
    main()
