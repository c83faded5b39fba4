"""The matrix products of one training step, XLA:CPU against torch, in one run.

    python benchmarks/gemm_vs_torch.py --arch vit_small_patch16_224 --batch 16 --size 224
    python benchmarks/gemm_vs_torch.py --arch convnext_tiny --json out.json

Every linear layer of the model (ViT: qkv, proj, fc1, fc2 per block; ConvNeXt: the two 1x1
convs of the MLP per block) at the train step's shapes, in its three products: forward x @ W,
input gradient dy @ W^T and weight gradient x^T @ dy. Each is timed as one jitted call (with the
trainer's compiler options, `bgjax/xla_options.py`; `xla_default` without them) and as the same
product in torch: rounds over the three, each a few back-to-back calls after `--settle` s
idle and one untimed call; medians. Per-step seconds weight each product by how many layers
have it. This is where the CPU train step's gap to timm comes from (BENCHMARKS.md): the
products are ~90% of both steps' FLOPs (XLA's cost analysis), and no step-level change
moves a GEMM kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

PRODUCTS = ("forward", "input_grad", "weight_grad")
IMPLS = ("xla", "xla_default", "torch")
COLUMNS = ("layer", "m", "k", "n", "count", "product", *(f"{i}_gflops" for i in IMPLS), "ratio")


def linear_layers(arch: str, batch: int, size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, rows, in, out, how many) of every linear layer of `arch` in one train step, from
    the architecture's constructor arguments (bgjax.models' registries). Plain-MLP ViTs and
    ConvNeXts; the gated DINOv2-giant MLP is not covered."""
    from bgjax.models import convnext, vit

    if arch in vit.MODELS and not vit.MODELS[arch].keywords.get("gated_mlp"):
        a = vit.MODELS[arch].keywords
        width, depth, hidden = (
            a["embed_dim"],
            a["depth"],
            int(a.get("mlp_ratio", 4) * a["embed_dim"]),
        )
        rows = batch * ((size // a["patch_size"]) ** 2 + 1 + a.get("reg_tokens", 0))
        return [
            ("qkv", rows, width, 3 * width, depth),
            ("proj", rows, width, width, depth),
            ("fc1", rows, width, hidden, depth),
            ("fc2", rows, hidden, width, depth),
        ]
    if arch in convnext.MODELS:
        a = convnext.MODELS[arch].keywords
        layers = []
        for stage, (dim, depth) in enumerate(zip(a["dims"], a["depths"])):
            rows = batch * (size // 4 // 2**stage) ** 2
            layers += [
                (f"s{stage}.fc1", rows, dim, 4 * dim, depth),
                (f"s{stage}.fc2", rows, 4 * dim, dim, depth),
            ]
        return layers
    raise ValueError(f"unknown arch {arch!r}: a bgjax ViT (plain MLP) or ConvNeXt name")


def jax_products(options):
    import jax
    from jax import lax

    def contract(a_dim, b_dim):
        return lambda a, b: lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())))

    return {  # operands: (x [m,k], w [k,n]), (dy [m,n], w [k,n]), (x [m,k], dy [m,n])
        "forward": jax.jit(contract(1, 0), compiler_options=options),
        "input_grad": jax.jit(contract(1, 1), compiler_options=options),
        "weight_grad": jax.jit(contract(0, 0), compiler_options=options),
    }


def run(args) -> dict:
    threads = common.limit_threads(args.threads)
    import jax
    import numpy as np
    import torch

    from bgjax import xla_options

    torch.set_num_threads(threads)
    calls = {
        "xla": jax_products(xla_options.compiler_options()),
        "xla_default": jax_products(None),
    }
    rng = np.random.default_rng(0)
    rows = []
    for name, m, k, n, count in linear_layers(args.arch, args.batch, args.size):
        x, w, dy = (rng.standard_normal(s, np.float32) for s in ((m, k), (k, n), (m, n)))
        operands = {"forward": (x, w), "input_grad": (dy, w), "weight_grad": (x, dy)}
        torch_fns = {
            "forward": lambda a, b: a @ b,
            "input_grad": lambda a, b: a @ b.t(),
            "weight_grad": lambda a, b: a.t() @ b,
        }
        for product in PRODUCTS:
            a, b = operands[product]
            jax_args = (jax.device_put(a), jax.device_put(b))
            impls = {impl: (calls[impl][product], jax_args) for impl in calls}
            impls["torch"] = (torch_fns[product], (torch.from_numpy(a), torch.from_numpy(b)))
            times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            for _ in range(args.reps):
                for impl, (fn, fn_args) in impls.items():
                    # Idle first: torch's OpenMP threads spin for a while after a call and slow
                    # whatever runs next. Then an untimed call (threads awake, caches warm) and
                    # `--calls` timed back-to-back calls, as in a train step.
                    time.sleep(args.settle)
                    jax.block_until_ready(fn(*fn_args))  # torch tensors pass through
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        jax.block_until_ready(fn(*fn_args))
                        times[impl].append(time.perf_counter() - start)
            seconds = {impl: statistics.median(t) for impl, t in times.items()}
            row = dict(layer=name, m=m, k=k, n=n, count=count, product=product)
            row.update({f"{impl}_s": s for impl, s in seconds.items()})
            row.update({f"{impl}_gflops": 2 * m * k * n / s / 1e9 for impl, s in seconds.items()})
            row["ratio"] = seconds["torch"] / seconds["xla"]
            rows.append(row)
    per_step = {impl: sum(r[f"{impl}_s"] * r["count"] for r in rows) for impl in IMPLS}
    by_product = {
        p: {
            impl: sum(r[f"{impl}_s"] * r["count"] for r in rows if r["product"] == p)
            for impl in IMPLS
        }
        for p in PRODUCTS
    }
    return dict(
        arch=args.arch,
        batch=args.batch,
        size=args.size,
        threads=threads,
        rows=rows,
        per_step_s=per_step,
        per_step_by_product_s=by_product,
        ratio=per_step["torch"] / per_step["xla"],
        machine=common.machine_info(),
    )


def report(result: dict) -> str:
    head = (
        f"### matrix products of one train step: {result['arch']}, batch {result['batch']}, "
        f"{result['size']} px, fp32, {result['threads']} threads"
    )
    totals = [
        dict(product=p, **{f"{i}_s": s[i] for i in IMPLS}, ratio=s["torch"] / s["xla"])
        for p, s in [*result["per_step_by_product_s"].items(), ("all", result["per_step_s"])]
    ]
    return "\n\n".join(
        [
            head,
            common.markdown_table(result["rows"], COLUMNS),
            "seconds per train step (ratio: torch / xla, above 1 = XLA faster):",
            common.markdown_table(totals, ("product", *(f"{i}_s" for i in IMPLS), "ratio")),
            common.machine_line(result["machine"]),
        ]
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3, help="rounds over the implementations")
    p.add_argument("--calls", type=int, default=3, help="timed calls per implementation and round")
    p.add_argument("--settle", type=float, default=0.2, help="idle seconds before each call")
    p.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    common.prepare_process()
    main()
