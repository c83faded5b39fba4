"""Training throughput and MFU of bgjax's train step on whatever backend JAX has.

    python benchmarks/train_throughput.py --arch vit_base_patch16_224 --batch 256 --dtype bfloat16
    python benchmarks/train_throughput.py --arch convnext_base --batch 128 --dtype bfloat16 \
        --remat block
    python benchmarks/train_throughput.py --arch tiny_vit --batch 8 --size 32 --steps 2  # CPU smoke

The step is `bgjax.train.jit_train_step` (AdamW, fp32 parameters, compute in `--dtype`),
the trainer's own jitted step (state donated, batch sharded over all mesh axes), on a mesh of
the first `--devices` devices. Batches are random uint8 images made on the host and sent to
the devices `--prefetch` steps ahead (double buffering), so host->device copies overlap the
compute as in training. Attention is `jax.nn.dot_product_attention`, with the cuDNN fused
kernel on GPUs in bf16 (`--attn-impl auto`).

Timing: `--repeats` windows of `--steps` steps each, dispatched asynchronously and waited for
at the end of the window; the median window gives img/s. FLOPs per step come from XLA's cost
analysis of the compiled step (`tflops`, `mfu`; with remat it counts the recomputation) and,
for the architectures of docs/reference.md#architecture-gmacs at 224 px, from 6 x forward
GMACs per image (`tflops_6mac`, `mfu_6mac`: model FLOPs). MFU is against the bf16 dense peak of
the device kind (table below; none for CPUs).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

# Forward GMACs per 224 px image (docs/reference.md#architecture-gmacs); training FLOPs ~ 6 x MACs.
FORWARD_GMACS_224 = {
    "convnext_tiny": 4.47,
    "convnext_small": 8.71,
    "convnext_base": 15.38,
    "convnext_large": 34.4,
    "vit_small_patch16_224": 4.61,
    "vit_base_patch16_224": 17.58,
    "vit_large_patch16_224": 61.6,
}
# bf16 dense peak TFLOP/s per device, by a substring of the lower-cased `device_kind`; first
# match wins (so "tpu v5 lite" (v5e) is tested before "tpu v5" (v5p)).
PEAK_BF16_TFLOPS = (
    ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
)
COLUMNS = (
    "arch", "dtype", "remat", "devices", "batch", "img_s", "img_s_device", "cpu_img_s",
    "step_s", "tflops", "tflops_6mac", "mfu", "mfu_6mac", "compile_s", "loss",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224", help="model name, or tiny_vit/...")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="none", choices=("none", "block"))
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--devices", type=int, default=None, help="mesh size (default: all)")
    p.add_argument("--mesh", default="data", choices=("data", "fsdp"), help="parallelism")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2, help="batches on the device ahead")
    p.add_argument("--attn-impl", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--dw-impl", default=None, help="ConvNeXt depthwise conv: auto|shifted|grouped")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.repeats, args.prefetch) < 1:
        p.error("--batch, --steps, --repeats and --prefetch must be positive")
    return args


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def model_flops_per_image(arch: str, size: int) -> float | None:
    """Training FLOPs per image, 6 x forward MACs, for the reference architectures at 224 px."""
    gmacs = FORWARD_GMACS_224.get(arch)
    return None if gmacs is None or size != 224 else 6.0 * gmacs * 1e9


def attention_impl(args, backend: str) -> str | None:
    """The ViT attention backend: cuDNN's fused kernel on GPUs in bf16, else XLA's."""
    if args.attn_impl != "auto":
        return args.attn_impl
    return "cudnn" if backend == "gpu" and args.dtype == "bfloat16" else None


def build(args, mesh, backend: str):
    """(TrainStep, attention implementation used): falls back to XLA attention when the
    cuDNN kernel does not compile here (old cuDNN, unsupported shape)."""
    overrides = {}
    if args.dw_impl:
        overrides["dw_impl"] = args.dw_impl
    model_name = common.model_kwargs(args.arch, args.size)["name"]
    attn = attention_impl(args, backend) if model_name.startswith("vit_") else None
    if attn:
        overrides["attn_impl"] = attn

    def make(**extra):
        config = common.train_config(
            args.arch,
            batch=args.batch,
            size=args.size,
            num_classes=args.classes,
            dtype=args.dtype,
            remat=args.remat == "block",
            grad_accum=args.grad_accum,
            **{**overrides, **extra},
        )
        return common.build_train_step(config, mesh)

    try:
        return make(), attn
    except Exception as error:  # only the auto-chosen cuDNN path falls back
        if attn != "cudnn" or args.attn_impl == "cudnn":
            raise
        print(f"cuDNN attention unavailable ({type(error).__name__}: {error}); using XLA's")
        return make(attn_impl=None), None


def make_mesh(args):
    import jax

    from bgjax import parallel

    available = jax.devices()
    count = len(available) if args.devices is None else args.devices
    if not 1 <= count <= len(available):
        raise SystemExit(f"--devices {count}: {len(available)} {jax.default_backend()} devices")
    axes = [("data", count), ("fsdp", 1)] if args.mesh == "data" else [("data", 1), ("fsdp", count)]
    return parallel.make_mesh(axes, devices=available[:count])


def run(args) -> dict:
    import jax

    backend = jax.default_backend()
    mesh = make_mesh(args)
    train_step, attn = build(args, mesh, backend)
    batches = common.device_batches(
        common.host_batches(args.batch, args.size, args.classes), mesh, prefetch=args.prefetch
    )
    state, metrics = train_step.state, None

    def run_steps(count: int):
        nonlocal state, metrics
        for _ in range(count):
            state, metrics = train_step.step(state, next(batches))
        jax.block_until_ready((state, metrics))

    run_steps(args.warmup)
    timings = common.Timings()
    for _ in range(args.repeats):
        common.time_call(lambda: run_steps(args.steps), timings)
    row = timings.summary(args.batch * args.steps, common.available_cores())
    row["step_s"] /= args.steps
    row["step_cpu_s"] /= args.steps
    if backend != "cpu":  # the host CPU time says nothing about an accelerator's work
        row["cpu_img_s"] = row["step_cpu_s"] = None
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} after {args.warmup} + steps")

    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    devices = mesh.size
    model_flops = model_flops_per_image(args.arch, args.size)
    xla_tflops = None if train_step.flops is None else train_step.flops / row["step_s"] / 1e12
    model_tflops = None if model_flops is None else model_flops * row["img_s"] / 1e12

    def mfu(tflops):
        return None if tflops is None or peak is None else tflops / (peak * devices)

    row.update(
        arch=args.arch,
        dtype=args.dtype,
        remat=args.remat,
        devices=devices,
        batch=args.batch,
        img_s_device=row["img_s"] / devices,
        tflops=xla_tflops,
        tflops_6mac=model_tflops,
        mfu=mfu(xla_tflops),
        mfu_6mac=mfu(model_tflops),
        compile_s=train_step.compile_s,
        loss=loss,
        flops_step_xla=train_step.flops,
        flops_step_6mac=None if model_flops is None else model_flops * args.batch,
        attn_impl=attn,
    )
    return dict(
        benchmark="train_throughput",
        args=vars(args),
        peak_tflops_per_device=peak,
        machine=common.machine_info(),
        rows=[row],
    )


def report(result: dict) -> str:
    a, row = result["args"], result["rows"][0]
    peak = result["peak_tflops_per_device"]
    peak_text = f"{peak:g} TFLOP/s bf16 dense per device" if peak else "none known (MFU n/a)"
    flops = (
        f"FLOPs/step: XLA cost analysis {common.fmt(row['flops_step_xla'])}, "
        f"6 x forward MACs {common.fmt(row['flops_step_6mac'])}"
    )
    return (
        f"### train throughput: {a['arch']} {a['dtype']} remat={a['remat']} "
        f"attention={row['attn_impl'] or 'default'} mesh={a['mesh']}\n\n"
        f"{common.markdown_table(result['rows'], COLUMNS)}\n\n"
        f"peak: {peak_text}; {flops}\n{common.machine_line(result['machine'])}"
    )


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    common.prepare_process()
    main()
