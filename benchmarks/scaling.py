"""Data-parallel scaling of the train step over 1, 2, 4, 8 devices, global batch scaled with N.

    python benchmarks/scaling.py --arch tiny_convnext --size 64 --batch-per-device 8
    python benchmarks/scaling.py --arch vit_base_patch16_224 --batch-per-device 128 \
        --dtype bfloat16 --devices 1,2,4,8          # unchanged on an 8-GPU / TPU host

Each N runs `train_throughput.py --devices N` in its own process (one JAX runtime per N) with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`: on a CPU-only host that simulates N
devices, on a GPU/TPU host the flag only concerns the unused host platform and the first N real
devices are taken. Counts above the devices present are skipped.

speedup = img/s(N) / img/s(1); efficiency = speedup / N. Simulated CPU devices share the host's
cores, so there the ideal is a flat img/s (speedup 1): the table then shows what partitioning
the step (collectives, per-device dispatch) costs, not parallel speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

HERE = Path(__file__).resolve().parent
COLUMNS = (
    "devices", "batch", "img_s", "img_s_device", "cpu_img_s", "step_s", "speedup", "efficiency",
    "mfu", "compile_s",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--arch", default="tiny_convnext")
    p.add_argument("--batch-per-device", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="data", choices=("data", "fsdp"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per device count")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        args.device_counts = sorted({int(n) for n in args.devices.split(",") if n.strip()})
    except ValueError:
        p.error(f"--devices must be comma-separated integers, got {args.devices!r}")
    if not args.device_counts or min(args.device_counts) < 1:
        p.error(f"--devices needs positive counts, got {args.devices!r}")
    return args


def child_env(count: int) -> dict[str, str]:
    """The environment with `count` simulated host devices (replacing any inherited count)."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    return env


def run_one(args, count: int, workdir: Path) -> dict | None:
    """train_throughput.py on `count` devices -> its result row, or None if there are fewer."""
    out = workdir / f"devices_{count}.json"
    cmd = [
        sys.executable, str(HERE / "train_throughput.py"),
        "--arch", args.arch, "--size", str(args.size), "--dtype", args.dtype,
        "--batch", str(args.batch_per_device * count), "--devices", str(count),
        "--mesh", args.mesh, "--steps", str(args.steps), "--repeats", str(args.repeats),
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=child_env(count), capture_output=True, text=True, timeout=args.timeout
    )
    if proc.returncode != 0:
        if f"--devices {count}:" in proc.stderr + proc.stdout:
            print(f"skipping {count} devices: {proc.stderr.strip().splitlines()[-1]}")
            return None
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    return dict(result["rows"][0], machine=result["machine"])


def run(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgjax_scaling_") as tmp:
        for count in args.device_counts:
            row = run_one(args, count, Path(tmp))
            if row is not None:
                rows.append(row)
                print(f"{count} devices: {row['img_s']:.1f} img/s", flush=True)
    if not rows:
        raise SystemExit("no device count could run")
    base = rows[0]
    for row in rows:
        # Relative to the smallest count run, per device, so a missing 1 still gives a table.
        row["speedup"] = row["img_s"] / base["img_s"] * base["devices"]
        row["efficiency"] = row["speedup"] / row["devices"]
    machine = rows[0].pop("machine")
    for row in rows[1:]:
        row.pop("machine")
    return dict(benchmark="scaling", args=vars(args), machine=machine, rows=rows)


def report(result: dict) -> str:
    a, m = result["args"], result["machine"]
    simulated = m["backend"] == "cpu"
    note = (
        "simulated CPU devices sharing the same cores: the ideal is speedup 1 (flat img/s)"
        if simulated
        else f"{m['device_kind']} devices"
    )
    return (
        f"### scaling: {a['arch']} {a['dtype']} {a['size']} px, "
        f"{a['batch_per_device']} images per device, mesh={a['mesh']} ({note})\n\n"
        f"{common.markdown_table(result['rows'], COLUMNS)}\n\n{common.machine_line(m)}"
    )


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
