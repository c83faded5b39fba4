"""The depthwise-convolution lowering of a config's ConvNeXt: train step time per choice.

    python benchmarks/depthwise.py                                   # the demo's ConvNeXt
    python benchmarks/depthwise.py --config synthetic.py:size=small \
        --override model.patch_size=2                                # the demo's late run
    python benchmarks/depthwise.py --config segmenter.py:arch=convnext,size=tiny \
        --override data.image_size=32

For each `model.dw_impl` (`grouped`: one grouped convolution; `shifted`: the CPU kernel set's k*k
shifted multiply-adds with an FFT kernel gradient) the trainer's jitted step of the config's
model, batch and image size (`common.build_train_step`: state donated, compiled ahead) is timed
on random uint8 batches: `--repeats` windows of `--steps` steps, the choices alternating window
by window so that load changes hit both; the median window is reported, with compile time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # benchmarks/ is not a package: found via sys.path

COLUMNS = ("dw_impl", "ms_step", "img_s", "compile_s", "speedup")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="synthetic.py:arch=convnext,size=small")
    p.add_argument("--override", action="append", default=[], help="key=value (repeatable)")
    p.add_argument("--choices", default="grouped,shifted")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def config_for(args, dw_impl: str):
    from bgjax import config_utils

    config = config_utils.load_config(args.config)
    overrides = dict(item.split("=", 1) for item in args.override)
    config = config_utils.apply_overrides(config, overrides)
    config.model.dw_impl = dw_impl
    return config


def run(args) -> dict:
    import jax

    from bgjax import parallel

    mesh = parallel.make_mesh([("data", 1)], devices=jax.devices()[:1])
    steps = {c: common.build_train_step(config_for(args, c), mesh) for c in args.choices.split(",")}
    first = next(iter(steps.values())).config
    batch, size = first.batch_size, first.data.image_size
    batches = [jax.device_put(b) for b in common.host_batches(batch, size, 1, count=2)]
    states = {c: s.state for c, s in steps.items()}
    windows = {c: [] for c in steps}
    for _ in range(args.repeats + 1):  # the first window of each choice warms up
        for choice, compiled in steps.items():
            state = states[choice]
            start = time.perf_counter()
            for i in range(args.steps):
                state, _ = compiled.step(state, batches[i % 2])
            jax.block_until_ready(state)
            windows[choice].append((time.perf_counter() - start) / args.steps)
            states[choice] = state
    rows = []
    for choice, compiled in steps.items():
        step_s = statistics.median(windows[choice][1:])
        rows.append(dict(dw_impl=choice, ms_step=1e3 * step_s, img_s=batch / step_s,
                         compile_s=compiled.compile_s))  # fmt: skip
    slowest = max(r["ms_step"] for r in rows)
    for r in rows:
        r["speedup"] = slowest / r["ms_step"]
    return dict(config=args.config, overrides=args.override, batch=batch, image_size=size,
                rows=rows, machine=common.machine_info())  # fmt: skip


def report(result: dict) -> str:
    title = (f"{result['config']} {' '.join(result['overrides'])} (batch {result['batch']}, "
             f"{result['image_size']} px)")  # fmt: skip
    return "\n".join([title, common.markdown_table(result["rows"], COLUMNS),
                      common.machine_line(result["machine"])])  # fmt: skip


def main(argv=None) -> dict:
    return common.main(parse_args(argv), run, report)


if __name__ == "__main__":
    common.prepare_process()
    main()
