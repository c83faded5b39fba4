"""The accelerator reference for `train_throughput.py`: timm's model + torch AdamW under AMP.

    python benchmarks/timm_amp.py --arch vit_base_patch16_224 --batch 256 --json timm.json
    python benchmarks/train_throughput.py --arch vit_base_patch16_224 --batch 256 \
        --reference timm.json          # ours, timm's row and the ratio in one table
    python benchmarks/timm_amp.py --arch tiny_vit --size 32 --batch 4 --steps 2   # CPU smoke

The work per step is that of ours: the same kind of uint8 host batch sent to the device and
normalised there, timm's model of the same name in training mode under `torch.autocast`
(bf16 by default, as timm's train.py `--amp --amp-dtype bfloat16`: fp32 master weights),
cross-entropy, backward, one `torch.optim.AdamW` step (lr 1e-3, wd 0.05; fused on CUDA).
`--channels-last` (timm's flag; on by default for convolutional models, off for ViTs) and
`--compile` (`torch.compile`, not in timm's default recipe) are the usual speed options.

Run it in its own process before ours, in the same call on the same GPU: JAX takes most of the
GPU's memory when it starts, so one process cannot hold both. Timing: `--repeats` windows of
`--steps` steps, synchronised at the end of each; the median window gives img/s. Batches are
sent one step ahead (pinned memory, non-blocking copies), as ours are.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

COLUMNS = ("impl", "arch", "amp", "batch", "img_s", "step_s", "compile_s", "loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm name, or tiny_vit/...")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--amp", default="bfloat16", choices=("bfloat16", "float16", "none"))
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="default: on for convolutional models, off for ViTs")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (autotuning, compile)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.steps, args.batch, args.repeats) < 1:
        p.error("--steps, --batch and --repeats must be positive")
    return args


def make_model(args, torch):
    model, timm_version = common.timm_model(args.arch, args.size, args.classes)
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = not common.model_kwargs(args.arch, args.size)["name"].startswith("vit_")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return model, layout, channels_last, timm_version


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # timm's train.py does the same
    model, layout, channels_last, timm_version = make_model(args, torch)
    model.to(device=device, memory_format=layout).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=cuda)
    amp = None if args.amp == "none" else getattr(torch, args.amp)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def to_device(host):
        images = torch.from_numpy(host["image"]).permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
        labels = torch.from_numpy(host["label"]).long()
        if cuda:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    hosts = itertools.cycle(common.host_batches(args.batch, args.size, args.classes))
    queued = to_device(next(hosts))
    loss = None

    def train_step():
        nonlocal queued, loss
        images, labels = queued
        queued = to_device(next(hosts))  # the next batch travels while this one trains
        images = ((images.float() - mean) / std).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(step_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    train_step()  # the first step: cuDNN autotuning, torch.compile's compilation
    sync()
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        train_step()
    sync()
    windows = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step()
        sync()
        windows.append(time.perf_counter() - start)
    final_loss = float(loss.detach())
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"non-finite loss {final_loss}")
    step_s = statistics.median(windows) / args.steps
    row = dict(
        impl="timm AMP (torch)" if amp is not None else "timm (torch, fp32)",
        arch=args.arch,
        amp=args.amp,
        channels_last=channels_last,
        compiled=args.compile,
        batch=args.batch,
        img_s=args.batch / step_s,
        step_s=step_s,
        compile_s=first_s,  # the first step, whatever it spends on setting up
        loss=final_loss,
        windows_s=windows,
    )
    machine = dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        cpu=common.cpu_model(),
        torch=torch.__version__,
        timm=timm_version,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
    )
    return dict(benchmark="timm_amp", args=vars(args), machine=machine, rows=[row])


def report(result: dict) -> str:
    m, row = result["machine"], result["rows"][0]
    options = f"channels_last={row['channels_last']} compile={row['compiled']}"
    return (
        f"### timm reference: {row['arch']} amp={row['amp']} {options}\n\n"
        f"{common.markdown_table(result['rows'], COLUMNS)}\n\n"
        f"{m['date']}, {m['device']}, torch {m['torch']}, timm {m['timm']}"
    )


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
