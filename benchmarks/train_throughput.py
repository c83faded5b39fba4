"""Training throughput and MFU of bgjax's train step on whatever backend JAX has.

    python benchmarks/train_throughput.py --arch vit_base_patch16_224 --batch 256 --dtype bfloat16
    python benchmarks/train_throughput.py --arch convnext_base --batch 128 --dtype bfloat16 \
        --remat full --scan
    python benchmarks/train_throughput.py --arch tiny_vit --batch 8 --size 32 --steps 2  # CPU smoke

The step is `bgjax.train_step.jit_train_step` (AdamW, fp32 parameters, compute in `--dtype`),
the trainer's own jitted step (state donated, batch sharded over all mesh axes), on a mesh of
the first `--devices` devices. Batches are random uint8 images made on the host and sent to
the devices `--prefetch` steps ahead (double buffering), so host->device copies overlap the
compute as in training. Attention is the model's choice (`--attn-impl auto`, the trainer's
`model.attention`): cuDNN's fused kernel on NVIDIA GPUs in bf16, else XLA's. `--remat` is a
`bgjax.models.stacking` policy (`model.remat`; "block" is the older name of "full"), `--scan`
stores identical blocks stacked and runs them as one `lax.scan` (`model.scan_blocks`);
`compile_s` shows what it saves.

Timing: `--repeats` windows of `--steps` steps each, dispatched asynchronously and waited for
at the end of the window; the median window gives img/s.

MFU (`mfu`, the headline) = model FLOPs / (step time x peak x devices), model FLOPs = 6 x
forward multiply-accumulates per image, counted from the architecture (`forward_macs`: every
kernel times the positions it is applied at, plus ViT's two attention matmuls) at this image
size; `tflops` is the same count per second over all devices. Beside it, XLA's cost analysis
of the compiled step, which is PER DEVICE (an SPMD program is one device's share):
`xla_tflops_device`, `xla_mfu_device`. It counts remat's recomputation and overcounts the
grouped depthwise convolution's kernel gradient about C-fold (ConvNeXt), so it is not the
headline. The peak is the bf16 dense figure of the device kind (table below; `--peak-tflops`
for another device; none for CPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

# bf16 dense (no sparsity) peak TFLOP/s per device, by a substring of the lower-cased
# `device_kind` (vendor data sheets); first match wins, so the H100 PCIe / NVL parts and
# "tpu v5 lite" (v5e) come before the plain "h100" (SXM) and "tpu v5" (v5p).
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
)
COLUMNS = (
    "impl", "arch", "dtype", "remat", "scan", "devices", "batch", "img_s", "img_s_device",
    "cpu_img_s", "step_s", "tflops", "mfu", "xla_tflops_device", "xla_mfu_device", "compile_s",
    "loss",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224", help="model name, or tiny_vit/...")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    from bgjax.models import stacking

    remat_choices = (*stacking.REMAT_POLICIES, "block")
    p.add_argument("--remat", default="none", choices=remat_choices, help="block = full")
    p.add_argument(
        "--scan", action="store_true", help="identical blocks stacked, run as one lax.scan"
    )
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
    p.add_argument("--peak-tflops", type=float, default=None, help="per device (default: table)")
    p.add_argument(
        "--reference",
        default=None,
        help="a timm_amp.py --json result (same arch, same GPU) to report beside ours",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.repeats, args.prefetch) < 1:
        p.error("--batch, --steps, --repeats and --prefetch must be positive")
    return args


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def forward_macs(model, size: int) -> float | None:
    """Multiply-accumulates of one `size` px image's forward pass, from the architecture: each
    conv / linear kernel's size (= its MACs per output position, depthwise included) times the
    positions it is applied at, plus ViT's q k^T and attention x v. None for other families.
    Norms, activations and softmax are left out, as fvcore / timm's GMACs leave them out."""
    from flax import nnx

    from bgjax.models import convnext, vit

    if isinstance(model, vit.VisionTransformer):
        patches = (size // model.patch_size) ** 2
        tokens = patches + model.num_prefix_tokens
        attention = model.depth * 2 * tokens**2 * model.embed_dim
        positions = {"patch_embed": patches, "blocks": tokens}

        def where(path):
            return positions.get(path[0], 1)  # the head: once
    elif isinstance(model, convnext.ConvNeXt):
        attention = 0
        stem = model.stem[0].kernel.shape[0]  # the stem's patch size, 4

        def where(path):
            if path[0] == "stem":
                return (size // stem) ** 2
            if path[0] == "stages":
                return (size // (stem * 2 ** int(path[1]))) ** 2
            return 1  # the head
    else:
        return None
    kernels = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return float(
        attention
        + sum(where(path) * math.prod(v.shape) for path, v in kernels if path[-1] == "kernel")
    )


def model_flops_per_image(config) -> float | None:
    """Training FLOPs per image, 6 x forward MACs (`forward_macs`), of `config.model`."""
    from flax import nnx

    from bgjax import tasks

    model = nnx.eval_shape(lambda: tasks.make_model(config, config.data.num_classes))
    macs = forward_macs(model, config.data.image_size)
    return None if macs is None else 6.0 * macs


def build(args, mesh):
    """(TrainStep, attention implementation used): falls back to XLA attention when the
    cuDNN kernel the model picks (`model.attention`) does not compile here (old cuDNN)."""
    from bgjax.models import cpu_kernels

    overrides = {}
    if args.dw_impl:
        overrides["dw_impl"] = args.dw_impl
    if args.scan:
        overrides["scan_blocks"] = True
    model_name = common.model_kwargs(args.arch, args.size)["name"]
    attn = None
    if model_name.startswith("vit_"):
        overrides["attention"] = args.attn_impl
        attn = cpu_kernels.resolve_attention(args.attn_impl, args.dtype)

    def make(**extra):
        config = common.train_config(
            args.arch,
            batch=args.batch,
            size=args.size,
            num_classes=args.classes,
            dtype=args.dtype,
            remat="full" if args.remat == "block" else args.remat,
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
        return make(attention="xla"), "xla"


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

    reference = args.reference and load_reference(args.reference, args.arch)
    backend = jax.default_backend()
    mesh = make_mesh(args)
    train_step, attn = build(args, mesh)
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
    peak = args.peak_tflops or peak_tflops(kind)
    devices = mesh.size
    model_flops = model_flops_per_image(train_step.config)
    # XLA's count is one device's program: per device, against one device's peak.
    xla_tflops = None if train_step.flops is None else train_step.flops / row["step_s"] / 1e12
    model_tflops = None if model_flops is None else model_flops * row["img_s"] / 1e12

    def mfu(tflops, per: int):
        return None if tflops is None or peak is None else tflops / (peak * per)

    row.update(
        impl="ours (bgjax, jax)",
        arch=args.arch,
        dtype=args.dtype,
        remat=args.remat,
        scan=args.scan,
        devices=devices,
        batch=args.batch,
        img_s_device=row["img_s"] / devices,
        tflops=model_tflops,
        mfu=mfu(model_tflops, devices),
        xla_tflops_device=xla_tflops,
        xla_mfu_device=mfu(xla_tflops, 1),
        compile_s=train_step.compile_s,
        loss=loss,
        flops_step_model=None if model_flops is None else model_flops * args.batch,
        flops_step_xla_device=train_step.flops,
        attn_impl=attn,
    )
    result = dict(
        benchmark="train_throughput",
        args=vars(args),
        peak_tflops_per_device=peak,
        machine=common.machine_info(),
        rows=[row],
    )
    if reference:
        add_reference(result, reference, model_flops, mfu)
    return result


def load_reference(path: str, arch: str) -> dict:
    """A timm_amp.py --json result for `arch`, checked before anything compiles."""
    reference = json.loads(Path(path).read_text())
    if reference.get("benchmark") != "timm_amp":
        raise SystemExit(f"--reference {path}: not a timm_amp.py result")
    if reference["rows"][0]["arch"] != arch:
        raise SystemExit(f"--reference {path}: arch {reference['rows'][0]['arch']}, not {arch}")
    return reference


def add_reference(result: dict, reference: dict, model_flops: float | None, mfu) -> None:
    """timm_amp.py's result (one device) as a second row, with the same model-FLOPs MFU, and the
    ratio of the two img/s per device."""
    (ref,) = reference["rows"]
    tflops = None if model_flops is None else model_flops * ref["img_s"] / 1e12
    row = dict(ref, dtype=f"amp {ref['amp']}", devices=1, img_s_device=ref["img_s"])
    row.update(tflops=tflops, mfu=mfu(tflops, 1))
    result["rows"].append(row)
    result["reference_machine"] = reference["machine"]
    result["ratio"] = dict(img_s_device=result["rows"][0]["img_s_device"] / ref["img_s"])


def report(result: dict) -> str:
    a, row = result["args"], result["rows"][0]
    ratio = result.get("ratio")
    if ratio:
        reference = result["reference_machine"]
        versions = f"torch {reference['torch']}, timm {reference['timm']} on {reference['device']}"
        ratio = f"\nratio ours/timm, img/s per device: {ratio['img_s_device']:.2f} ({versions})"
    peak = result["peak_tflops_per_device"]
    peak_text = f"{peak:g} TFLOP/s bf16 dense per device" if peak else "none known (MFU n/a)"
    flops = (
        f"FLOPs/step: model (6 x forward MACs, all devices) {common.fmt(row['flops_step_model'])}"
        f", XLA cost analysis per device {common.fmt(row['flops_step_xla_device'])}"
    )
    return (
        f"### train throughput: {a['arch']} {a['dtype']} remat={a['remat']} scan={a['scan']} "
        f"attention={row['attn_impl'] or 'default'} mesh={a['mesh']}\n\n"
        f"{common.markdown_table(result['rows'], COLUMNS)}\n\n"
        f"peak: {peak_text}; {flops}\n{common.machine_line(result['machine'])}{ratio or ''}"
    )


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    common.prepare_process()
    main()
