r"""`bgjax demo`: both papers' findings on the built-in synthetic dataset, in minutes on a CPU.

    bgjax demo [--workdir runs/demo] [--quick]

Shapes on habitat textures, 9 classes, the habitat equal to the class in 90% of the training
images (`bgjax.data.synthetic`). For a small ConvNeXt and a small ViT it trains

    baseline     plain training on the original images
    mixed_rand   training on MIXED_RAND (the foreground on a random image's background; paper 1)
    early        background pixels black before the network, ground-truth masks  (paper 2)
    early_pred   the same with a segmenter's masks (trained once, shared by both archs)
    late         features masked after ConvNeXt stage 3 / the ViT's last block   (paper 2)

and evaluates each on the IID test split under all eight IN-9 variants (BG-gap = MIXED_SAME -
MIXED_RAND accuracy) and on the balanced split, where the habitat is independent of the class
(worst label x habitat group accuracy, and the training-weighted average). The summary
(summary.md / summary.json, plots, the variant grid) lands in the workdir and the table is
printed. Every finding is measured, not assumed: summary.json's `findings` says which held.

Everything runs in this process (the trainer's and the evaluator's functions), with JAX's
persistent compilation cache in WORKDIR/jax_cache, so runs that compile the same program (the
baseline and mixed_rand train steps, every eval of one model) compile once. Rerunning skips
finished runs and evaluations and resumes an interrupted training run from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

from bgjax import aggregate, clflags, config_utils, plots
from bgjax import data as data_lib
from bgjax import metrics as metrics_lib
from bgjax import train as train_lib
from bgjax import workdir as workdir_lib

ARCHS = ("convnext", "vit")
# Demo strategy -> (bgjax/configs/synthetic.py strategy, masks from the segmenter).
STRATEGIES: dict[str, tuple[str, bool]] = {
    "baseline": ("none", False),
    "mixed_rand": ("mixed_rand", False),
    "early": ("early", False),
    "early_pred": ("early", True),
    "late": ("late", False),
}
NUM_CLASSES = 9
BG_CORRELATION = 0.9


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes of one demo mode (full or quick)."""

    image_size: int
    batch_size: int
    convnext_steps: int  # classifier training steps per arch: the ViT's steps are cheaper
    vit_steps: int  # (16 tokens) and it needs more of them to learn the shapes
    train_per_class: int
    iid_size: int  # IID test images (each under 8 variants)
    ood_size: int  # balanced test images (81 label x habitat groups)
    segmenter_steps: int  # 0: no segmenter, so no early_pred runs
    archs: tuple[str, ...] = ARCHS
    seed: int = 0

    def steps(self, arch: str) -> int:
        return {"convnext": self.convnext_steps, "vit": self.vit_steps}[arch]


FULL = Settings(
    image_size=32,
    batch_size=64,
    convnext_steps=400,
    vit_steps=800,
    train_per_class=1000,
    iid_size=900,
    ood_size=1620,
    segmenter_steps=200,
)
# Quick (CI's end-to-end test; ~5 min): the ConvNeXt half of the full demo at the same training
# settings (fewer steps leave the Mixed-Rand run short of learning the shapes), without the
# segmenter, on smaller test sets.
QUICK = dataclasses.replace(FULL, iid_size=450, segmenter_steps=0, archs=("convnext",))


# ---------------------------------------------------------------------------------------------
# Configs


def _synthetic_config(arg: str) -> ml_collections.ConfigDict:
    return config_utils.load_config(f"{config_utils.CONFIGS_DIR / 'synthetic.py'}:{arg}")


def _apply_settings(c: ml_collections.ConfigDict, s: Settings, steps: int) -> None:
    """The demo's data, batch and schedule; one checkpoint at the end (and one half way, so an
    interrupted run resumes), no evaluation during training (the demo evaluates after)."""
    c.seed = s.seed
    if "img_size" in c.model:  # the ViT's position grid follows the image size
        c.model.img_size = s.image_size
    c.data.update(
        image_size=s.image_size,
        num_classes=NUM_CLASSES,
        bg_correlation=BG_CORRELATION,
        train_size=s.train_per_class * NUM_CLASSES,
        seed=s.seed,
    )
    c.batch_size = s.batch_size
    c.total_steps = steps
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.checkpoint.update(every_steps=max(1, steps // 2), keep=1, keep_best=0)
    c.eval.every_steps = 0
    c.eval.batch_size = 2 * s.batch_size
    c.log_every_steps = max(1, steps // 10)


def run_config(
    arch: str, strategy: str, s: Settings, *, segmenter_dir: str | None = None
) -> ml_collections.ConfigDict:
    """bgjax/configs/synthetic.py's experiment for `arch` x `strategy` (its small models), at the
    demo's sizes."""
    base_strategy, predicted = STRATEGIES[strategy]
    c = _synthetic_config(f"arch={arch},strategy={base_strategy},size=small")
    _apply_settings(c, s, s.steps(arch))
    if predicted:
        if segmenter_dir is None:
            raise ValueError(f"strategy {strategy!r} needs the segmenter's workdir")
        c.mask_source = segmenter_dir
    return c


def segmenter_config(s: Settings) -> ml_collections.ConfigDict:
    """bgjax/configs/segmenter.py's tiny synthetic ConvNeXt segmenter, on the demo's training images
    (saturated objects on muted textures: a small encoder segments them well)."""
    path = config_utils.CONFIGS_DIR / "segmenter.py"
    c = config_utils.load_config(f"{path}:arch=convnext,size=tiny")  # the smallest encoder
    _apply_settings(c, s, s.segmenter_steps)
    return c


# ---------------------------------------------------------------------------------------------
# Running


class SourceCache:
    """`get_source` for `aggregate.evaluate_run` that hands every run the same source objects:
    the synthetic source keeps what it rendered (`synthetic.CACHE_BYTES`), so every demo model
    is evaluated on images rendered once."""

    def __init__(self):
        self._sources: dict[str, Any] = {}

    def __call__(self, data: ml_collections.ConfigDict, split: str):
        key = json.dumps([data.to_dict(), split], sort_keys=True, default=str)
        if key not in self._sources:
            self._sources[key] = data_lib.get_source(data, split)
        return self._sources[key]


def eval_specs(s: Settings) -> list[aggregate.EvalSpec]:
    return [
        aggregate.EvalSpec("iid", "test_iid", data=dict(test_size=s.iid_size)),
        aggregate.EvalSpec(
            "ood", "test_balanced", variants=("original",), data=dict(test_size=s.ood_size)
        ),
    ]


class Interrupted(Exception):
    """SIGTERM/preemption arrived during a training run: its checkpoint is saved; stop the demo
    (rather than go on to the next run) so that rerunning the same command resumes it."""


def train_if_needed(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Train (or resume) unless the run is finished; True if it trained."""
    workdir_lib.check_same_config(workdir, config)
    if workdir_lib.is_finished(workdir, config.total_steps):
        return False
    if train_lib.train(config, workdir)["preempted"]:
        raise Interrupted(f"interrupted during {workdir}; its checkpoint is saved")
    return True


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent cache, unless the user configured one: identical programs (the same
    model under another training variant, each eval of one model) then compile once."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", directory)


def run_demo(
    workdir: str | os.PathLike,
    *,
    quick: bool = False,
    archs: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    settings: Settings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every (arch, strategy), write the summary; returns summary.json.
    `settings` replaces the quick / full sizes (tests of the plumbing)."""
    import tqdm

    s = settings or (QUICK if quick else FULL)
    archs = s.archs if archs is None else archs
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    if strategies is None:
        strategies = [k for k, (_, pred) in STRATEGIES.items() if s.segmenter_steps or not pred]
    unknown = sorted(set(strategies) - set(STRATEGIES)) + sorted(set(archs) - set(ARCHS))
    if unknown:
        raise ValueError(f"unknown demo strategies/archs {unknown}")
    if not s.segmenter_steps and "early_pred" in strategies:
        raise ValueError("strategy early_pred needs a segmenter run (segmenter_steps > 0)")

    jobs = [(arch, strategy) for arch in archs for strategy in strategies]
    segmenter_dir = os.path.join(workdir, "segmenter")
    needs_segmenter = any(STRATEGIES[st][1] for _, st in jobs)
    sources, specs = SourceCache(), eval_specs(s)
    timing: dict[str, dict[str, float]] = {}
    results: dict[str, dict[str, dict]] = {}
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    steps = [("segmenter", None)] if needs_segmenter else []
    bar = tqdm.tqdm(steps + jobs, desc="demo", unit="run", disable=not progress, dynamic_ncols=True)
    for arch, strategy in bar:
        name = "segmenter" if strategy is None else f"{arch}_{strategy}"
        bar.set_postfix_str(name)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        run_dir = os.path.join(workdir, name)
        if strategy is None:
            config = segmenter_config(s)
        else:
            config = run_config(arch, strategy, s, segmenter_dir=segmenter_dir)
        config.progress_bar = progress
        trained = train_if_needed(config, run_dir)
        if strategy is not None:
            evals = aggregate.evaluate_run(run_dir, specs, get_source=sources)
            results.setdefault(arch, {})[strategy] = evals
        timing[name] = dict(
            wall_s=time.perf_counter() - wall, cpu_s=_cpu_seconds() - cpu, trained=trained
        )
        logging.info("demo: %s done (%s)", name, timing[name])
    bar.close()
    timing["total"] = dict(
        wall_s=time.perf_counter() - start_wall, cpu_s=_cpu_seconds() - start_cpu
    )
    summary = summarize(results, s, quick=quick, timing=timing)
    write_summary(workdir, summary, s)
    return summary


# ---------------------------------------------------------------------------------------------
# Summary


def _run_summary(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    iid, ood = evals["iid"], evals["ood"]
    return dict(
        variants={k: v["accuracy"] for k, v in iid["variants"].items()},
        bg_gap=iid["bg_gap"],
        ood_accuracy=ood["variants"]["original"]["accuracy"],
        worst_group_accuracy=ood["worst_group_accuracy"],
        average_accuracy=ood["average_accuracy"],
        iid_images=iid["num_examples"],
        ood_images=ood["num_examples"],
        ood_smallest_group=min(g["count"] for g in ood["groups"].values()),
        buckets=iid.get("buckets"),
    )


def findings(runs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The papers' claims, checked on the measured numbers, per arch."""
    chance = 1.0 / NUM_CLASSES
    out = {}
    for arch, by_strategy in runs.items():
        base = by_strategy.get("baseline")
        f: dict[str, Any] = {}
        if base is not None:
            f["baseline_bg_gap_at_least_10_points"] = base["bg_gap"] >= 0.10
            f["baseline_only_bg_t_at_least_2x_chance"] = base["variants"]["only_bg_t"] >= 2 * chance
            for strategy in ("mixed_rand", "early", "early_pred", "late"):
                run = by_strategy.get(strategy)
                if run is None:
                    continue
                f[f"{strategy}_bg_gap_at_most_third_of_baseline"] = (
                    run["bg_gap"] <= base["bg_gap"] / 3
                )
                f[f"{strategy}_raises_worst_group_accuracy"] = (
                    run["worst_group_accuracy"] > base["worst_group_accuracy"]
                )
        if "early" in by_strategy and "late" in by_strategy:
            early, late = by_strategy["early"], by_strategy["late"]
            f["early_vs_late_ood"] = dict(
                early_accuracy=early["ood_accuracy"],
                late_accuracy=late["ood_accuracy"],
                early_worst_group=early["worst_group_accuracy"],
                late_worst_group=late["worst_group_accuracy"],
                better_on_balanced_split=(
                    "early" if early["ood_accuracy"] >= late["ood_accuracy"] else "late"
                ),
            )
        out[arch] = f
    return out


def summarize(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    s: Settings,
    *,
    quick: bool,
    timing: Mapping[str, Any],
) -> dict[str, Any]:
    runs = {
        arch: {strategy: _run_summary(evals) for strategy, evals in by_strategy.items()}
        for arch, by_strategy in results.items()
    }
    models = {arch: _model_summary(arch, s) for arch in results}
    return dict(
        mode="quick" if quick else "full",
        settings=dataclasses.asdict(s),
        dataset=dict(
            name="synthetic",
            num_classes=NUM_CLASSES,
            bg_correlation=BG_CORRELATION,
            chance=1.0 / NUM_CLASSES,
        ),  # fmt: skip
        models=models,
        runs=runs,
        findings=findings(runs),
        timing=dict(timing),
    )


def _model_summary(arch: str, s: Settings) -> dict[str, Any]:
    """The baseline's model config (name + overrides of bgjax/configs/synthetic.py) and its size."""
    config = run_config(arch, "baseline", s)
    training_keys = ("masking", "frozen_backbone", "init", "dtype", "drop_path_rate")
    model = {k: v for k, v in config.model.to_dict().items() if k not in training_keys}
    return dict(model, params=aggregate.count_params(config, NUM_CLASSES))


_pct = metrics_lib.pct


TABLE_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_bg_t", "only_fg")


def table_markdown(summary: Mapping[str, Any]) -> str:
    head = (
        "| arch | strategy | " + " | ".join(TABLE_VARIANTS)
        + " | BG-gap | OOD acc | worst group | OOD avg |"
    )  # fmt: skip
    lines = [head, "|---|---|" + "---:|" * (len(TABLE_VARIANTS) + 4)]
    for arch, by_strategy in summary["runs"].items():
        for strategy, r in by_strategy.items():
            cells = [_pct(r["variants"].get(v)) for v in TABLE_VARIANTS]
            cells += [_pct(r[k]) for k in ("bg_gap", "ood_accuracy", "worst_group_accuracy",
                                           "average_accuracy")]  # fmt: skip
            lines.append(f"| {arch} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _findings_markdown(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    for arch, f in summary["findings"].items():
        for claim, held in f.items():
            if isinstance(held, bool):
                lines.append(f"- {arch}: {claim.replace('_', ' ')}: **{'yes' if held else 'NO'}**")
        el = f.get("early_vs_late_ood")
        if el:
            lines.append(
                f"- {arch}: balanced (OOD) split, early vs late masking: accuracy "
                f"{_pct(el['early_accuracy'])} vs {_pct(el['late_accuracy'])}, worst group "
                f"{_pct(el['early_worst_group'])} vs {_pct(el['late_worst_group'])} "
                f"(better: {el['better_on_balanced_split']}; the masking paper found early best)"
            )
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    s, ds = summary["settings"], summary["dataset"]
    any_run = next(r for by in summary["runs"].values() for r in by.values())
    models = "; ".join(
        f"{arch}: {m['name']} with custom widths "
        f"{ {k: v for k, v in m.items() if k not in ('name', 'params')} } "
        f"({m['params'] / 1e6:.2f}M parameters)"
        for arch, m in summary["models"].items()
    )
    total = summary["timing"]["total"]
    parts = [
        f"# bgjax demo ({summary['mode']})",
        "",
        f"Synthetic shapes on habitats: {ds['num_classes']} classes (chance "
        f"{_pct(ds['chance'])}%), habitat = class in {_pct(ds['bg_correlation'])}% of the "
        f"training images; {s['image_size']} px, {s['train_per_class'] * ds['num_classes']} "
        f"training images, batch {s['batch_size']}, {s['convnext_steps']} steps (ConvNeXt) / "
        f"{s['vit_steps']} (ViT), seed {s['seed']}.",
        "",
        f"Models (tiny custom widths, so the demo fits a 2-core CPU): {models}.",
        "",
        f"IID test: {any_run['iid_images']} images under each of the 8 variants (BG-gap = "
        f"MIXED_SAME − MIXED_RAND). Balanced (OOD) test: {any_run['ood_images']} images, "
        f"habitat independent of the class, ≥ {any_run['ood_smallest_group']} per label × "
        "habitat group (worst-group accuracy; OOD avg = groups weighted by their training "
        "share). Accuracies in %.",
        "",
        table_markdown(summary),
        "",
        "## Findings (measured)",
        "",
        *_findings_markdown(summary),
        "",
        f"Time: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (user + sys).",
        "",
        "Plots: accuracy_per_variant.png, bg_gap_worst_group.png, variants.png.",
        "",
    ]
    return "\n".join(parts)


def write_summary(workdir: str, summary: Mapping[str, Any], s: Settings) -> dict[str, str]:
    paths = {k: os.path.join(workdir, f) for k, f in (
        ("json", "summary.json"), ("md", "summary.md"), ("variants", "accuracy_per_variant.png"),
        ("strategies", "bg_gap_worst_group.png"), ("grid", "variants.png"))}  # fmt: skip
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(summary_markdown(summary))
    runs = summary["runs"]
    plots.bar_panels(
        {arch: {st: r["variants"] for st, r in by.items()} for arch, by in runs.items()},
        paths["variants"],
        columns=1,
        chance=summary["dataset"]["chance"],
    )
    metrics = {
        "BG-gap, IID (%)": "bg_gap",
        "worst-group acc., balanced (%)": "worst_group_accuracy",
        "accuracy, balanced (%)": "ood_accuracy",
    }
    strategies = list(dict.fromkeys(st for by in runs.values() for st in by))
    plots.bar_panels(
        {
            title: {
                st: {arch: runs[arch].get(st, {}).get(key) for arch in runs} for st in strategies
            }
            for title, key in metrics.items()
        },
        paths["strategies"],
        ylabel="%",
        columns=3,
        ylim=None,
    )
    _variant_grid(paths["grid"], s)
    return paths


def _variant_grid(path: str, s: Settings) -> str:
    """The eight variants of a few training images (`bgjax show-variants`'s picture)."""
    from bgjax import show_variants  # a command module: imported only when drawing

    config = ml_collections.ConfigDict(
        dict(name="synthetic", image_size=s.image_size, num_classes=NUM_CLASSES,
             bg_correlation=BG_CORRELATION, seed=s.seed)
    )  # fmt: skip
    source = data_lib.get_source(config, "train")
    return plots.variant_grid(show_variants.variant_rows(source, 6, s.seed), path)


# ---------------------------------------------------------------------------------------------
# Command line

_WORKDIR = clflags.string("workdir", None, "Where the runs and the summary go.")
_QUICK = clflags.boolean(
    "quick", False, "ConvNeXt runs only, no segmenter, smaller IID set (~5 min on 2 cores)."
)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # the progress bars say what runs; logs go quiet
        logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value or ("runs/demo_quick" if _QUICK.value else "runs/demo")
    try:
        summary = run_demo(workdir, quick=_QUICK.value)
    except Interrupted as e:
        print(f"bgjax demo: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax demo: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_markdown(summary))
    print(f"wrote {epath.Path(workdir) / 'summary.md'}")
