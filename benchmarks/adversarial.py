"""Adversarial-background search: batched early-exit search vs the reference's serial loop.

    python benchmarks/adversarial.py [--workdir RUN] [--foregrounds 64] [--backgrounds 128]
                                     [--batch_size 64] [--reference_batch 32] [--json OUT]

Both searches run on the same model, foregrounds, background pool and background order, and
must find the same vulnerable foregrounds and the same first flipping backgrounds (checked).
Rows:

  serial/1           the reference loop one composite per forward pass (`serial_search`)
  serial/<R>         the reference's own batching: R backgrounds of one foreground per pass
  batched/<B>        `batched_search`: B composites of many foregrounds per pass, early exit

Reported per row: forward passes (composites through the model, padding excluded), padded rows,
wall seconds, process CPU seconds, composites per second, and the wall-time speed-up over
serial/1. The model is a workdir's latest checkpoint (`--workdir`), or else a randomly
initialised model of the `synthetic.py` config (a random model flips few foregrounds, so the
search runs long: a worst case for early exit). Compilation is excluded: each predictor is warmed up
on its batch shapes first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from bgjax import config_utils, hostmem, parallel, tasks
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.analysis import adversarial
from bgjax.data import pipeline


def load_model(workdir: str | None, config_arg: str):
    """(model, config, mean, std, mesh) from a workdir, or a fresh model of the config."""
    if workdir:
        r = workdir_lib.restore(workdir)
        return r.model, r.config, r.mean, r.std, r.mesh
    config = config_utils.load_config(f"synthetic.py:{config_arg}")
    info = data_lib.get_source(config.data, "train").info
    mesh = parallel.make_mesh([("data", -1)])
    model = tasks.make_model(config, info.num_classes, pixel_mean=info.mean, pixel_std=info.std)
    return model, config, info.mean, info.std, mesh


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="trained workdir (default: random model)")
    parser.add_argument("--config", default="arch=convnext,size=small", help="synthetic.py arg")
    parser.add_argument("--foregrounds", type=int, default=64)
    parser.add_argument("--backgrounds", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--reference_batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    model, config, mean, std, mesh = load_model(args.workdir, args.config)
    source = data_lib.get_source(config.data, "test")
    load = dict(image_size=config.data.image_size, seed=config.seed)
    fg = pipeline.load_examples(source, "original", limit=args.foregrounds, **load)
    bgs = pipeline.load_examples(source, "only_bg_t", limit=args.backgrounds, **load)["image"]
    predict = adversarial.composite_predictor(
        model, mesh, fg["image"], fg["mask"], bgs, mean=mean, std=std
    )
    order = adversarial.background_order(bgs.shape[0], args.seed)
    batch = -(-args.batch_size // mesh.size) * mesh.size
    for size in (1, args.reference_batch, batch, bgs.shape[0] % args.reference_batch):
        if size:  # compile every batch shape the searches will use
            predict(np.zeros(size, np.int32), np.zeros(size, np.int32))

    searches = {
        "serial/1": lambda: adversarial.serial_search(predict, fg["label"], order),
        f"serial/{args.reference_batch}": lambda: adversarial.serial_search(
            predict, fg["label"], order, per_pass=args.reference_batch
        ),
        f"batched/{batch}": lambda: adversarial.batched_search(
            predict, fg["label"], order, batch_size=batch
        ),
    }
    rows, reference = [], None
    for name, search in searches.items():
        result, wall, cpu = timed(search)
        if reference is None:
            reference = (result, wall)
        same = np.array_equal(result.flip_background, reference[0].flip_background)
        if not same:
            raise AssertionError(f"{name} found other flipping backgrounds than serial/1")
        rows.append(
            dict(
                search=name,
                forward_passes=result.forward_passes,
                padded_rows=result.padded_passes,
                wall_s=wall,
                cpu_s=cpu,
                composites_per_s=(result.forward_passes + result.padded_passes) / wall,
                speedup_vs_serial=reference[1] / wall,
                vulnerable=int(result.vulnerable.sum()),
            )
        )
    print(
        f"{fg['label'].size} foregrounds x {bgs.shape[0]} backgrounds "
        f"(exhaustive: {fg['label'].size * bgs.shape[0]} composites), {jax.device_count()} "
        f"{jax.default_backend()} device(s), model {config.model.name}"
        f"{' (' + args.workdir + ')' if args.workdir else ' (random init)'}"
    )
    print(f"{'search':<14} {'passes':>8} {'padded':>7} {'wall s':>8} {'cpu s':>8} "
          f"{'img/s':>8} {'speed-up':>9} {'vulnerable':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['search']:<14} {r['forward_passes']:>8} {r['padded_rows']:>7} "
            f"{r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['composites_per_s']:>8.1f} "
            f"{r['speedup_vs_serial']:>8.1f}x {r['vulnerable']:>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    hostmem.keep_freed_memory()  # as `bgjax` does, before JAX starts
    main()
