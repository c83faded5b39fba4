"""Training throughput on the CPU: bgjax's train step against timm + torch AdamW, in one run.

    python benchmarks/train_vs_timm.py --arch convnext_tiny --batch 16 --size 224 --steps 5
    python benchmarks/train_vs_timm.py --arch vit_small_patch16_224 --steps 5 --json out.json
    python benchmarks/train_vs_timm.py --arch tiny_vit --batch 4 --size 32 --steps 2   # smoke

Both sides do the same work per step: the same uint8 host batch (9 classes) is normalised,
forwarded in fp32 in training mode, cross-entropy, backward, one AdamW update (lr 1e-3, wd
0.05, no clipping). Ours is `bgjax.train_step.jit_train_step`, the trainer's own jitted step (state
donated, batch transferred to the device one step ahead); the reference is timm's model of the
same name with `torch.optim.AdamW`. torch gets as many threads as XLA's CPU pool (`--threads`,
default: every core this process may use).

The steps of the two alternate (ours, timm, ours, timm, ...) so that load changes on a shared
machine hit both alike; medians of the per-step times are reported, wall-clock and CPU-time
based (see common.py). Compilation and `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

COLUMNS = (
    "impl",
    "img_s",
    "cpu_img_s",
    "step_s",
    "step_cpu_s",
    "cpu_util",
    "page_faults",
    "compile_s",
    "loss",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="convnext_tiny", help="timm name, or tiny_convnext/tiny_vit")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps after compilation (2: both sides' heaps reach their steady layout)",
    )
    p.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--dw-impl", default=None, help="ConvNeXt depthwise conv: auto|shifted|grouped")
    p.add_argument("--attn-impl", default=None, help="ViT attention: xla|cudnn (default: JAX's)")
    p.add_argument("--channels-last", action="store_true", help="torch: channels_last layout")
    p.add_argument("--impls", default="ours,timm", help="which sides to run (profiling one)")
    p.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="idle seconds before each timed step, so the other side's worker threads (torch's "
        "OpenMP threads spin-wait after a parallel region) are asleep when the clock starts",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    if not args.impls or set(args.impls) - {"ours", "timm"}:
        p.error(f"--impls takes ours and/or timm, got {args.impls}")
    return args


def model_overrides(args) -> dict:
    overrides = {}
    if args.dw_impl:
        overrides["dw_impl"] = args.dw_impl
    if args.attn_impl:
        overrides["attn_impl"] = args.attn_impl
    return overrides


class Ours:
    """bgjax's train step on one device."""

    name = "ours (bgjax, jax)"

    def __init__(self, args, batches):
        import jax

        from bgjax import parallel

        config = common.train_config(
            args.arch,
            batch=args.batch,
            size=args.size,
            num_classes=args.classes,
            **model_overrides(args),
        )
        mesh = parallel.make_mesh([("data", 1)], devices=jax.devices()[:1])
        self.train_step = common.build_train_step(config, mesh)
        self.state = self.train_step.state
        self.batches = common.device_batches(batches, mesh)
        self.compile_s = self.train_step.compile_s
        self.loss = float("nan")

    def step(self) -> None:
        import jax

        self.state, metrics = self.train_step.step(self.state, next(self.batches))
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss"])


class Timm:
    """timm's model of the same architecture + torch AdamW, same host batches."""

    name = "timm (torch)"

    def __init__(self, args, batches, threads: int):
        import itertools

        import torch

        self.model, _ = common.timm_model(args.arch, args.size, args.classes)
        torch.set_num_threads(threads)
        self.model.train()
        self.layout = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.layout)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        self.batches = itertools.cycle(batches)
        self.compile_s = None
        self.loss = float("nan")

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        host = next(self.batches)
        images = torch.from_numpy(host["image"]).permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
        images = images.contiguous(memory_format=self.layout).float()
        images = (images - self.mean) / self.std
        labels = torch.from_numpy(host["label"]).long()
        loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss = float(loss.detach())


def run(args) -> dict:
    threads = common.limit_threads(args.threads)
    batches = common.host_batches(args.batch, args.size, args.classes)
    impls = []
    if "ours" in args.impls:
        impls.append(Ours(args, batches))
    if "timm" in args.impls:
        impls.append(Timm(args, batches, threads))
    for impl in impls:
        for _ in range(args.warmup):
            impl.step()
    timings = {impl.name: common.Timings() for impl in impls}
    for _ in range(args.steps):
        for impl in impls:
            time.sleep(args.settle)
            common.time_call(impl.step, timings[impl.name])

    rows = []
    for impl in impls:
        row = dict(impl=impl.name, compile_s=impl.compile_s, loss=impl.loss)
        row.update(timings[impl.name].summary(args.batch, threads))
        rows.append(row)
    ratio = None
    if len(rows) == 2:
        ours, ref = rows
        ratio = dict(
            impl="ratio ours/timm",
            img_s=ours["img_s"] / ref["img_s"],
            cpu_img_s=ours["cpu_img_s"] / ref["cpu_img_s"],
        )
    return dict(
        benchmark="train_vs_timm",
        args=vars(args),
        threads=threads,
        machine=common.machine_info(),
        rows=rows,
        ratio=ratio,
    )


def report(result: dict) -> str:
    a = result["args"]
    title = (
        f"### train step vs timm: {a['arch']}, batch {a['batch']}, {a['size']} px, fp32, "
        f"{a['classes']} classes, {result['threads']} threads"
    )
    ratio = [result["ratio"]] if result["ratio"] else []
    table = common.markdown_table([*result["rows"], *ratio], COLUMNS)
    return f"{title}\n\n{table}\n\n{common.machine_line(result['machine'])}"


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    # Full-size models on the CPU: each step's temporaries stay in the main heap (bgjax/hostmem.py),
    # as README recommends for such runs (BGJAX_KEEP_HEAP=sync).
    common.prepare_process(sync_cpu_dispatch=True)
    main()
