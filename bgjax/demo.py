r"""`bgjax demo`: both papers' findings on the built-in synthetic dataset, in minutes on a CPU.

    bgjax demo [--workdir runs/demo] [--quick] [--baselines]

Shapes on habitat textures, 9 classes, the habitat equal to the class in 90% of the training
images (`bgjax.data.synthetic`). The demo is the sweep `bgjax/configs/sweeps/demo.py` (a small
ConvNeXt and a small ViT, each trained plainly, on MIXED_RAND, with early masking by
ground-truth and by a segmenter's masks, and with late masking), trained here one run after
another, then each run evaluated on the IID test split under all eight IN-9 variants (BG-gap =
MIXED_SAME - MIXED_RAND accuracy) and on the balanced split, where the habitat is independent of
the class (worst label x habitat group accuracy, and the training-weighted average). The papers'
claims are checked on the measured numbers (`bgjax.findings`); summary.json's `findings` says
which held. The summary (summary.md / summary.json, plots, the variant grid) lands in the
workdir and the table is printed.

--baselines puts the field's group-robustness baselines in the same table: the ConvNeXt runs of
--quick (ERM = `baseline`, mixed_rand, early, late; no segmenter) at the full IID set, plus
group-balanced sampling, Group DRO, JTT (after a short identification run) and DFR of the ERM
run (`bgjax.dfr`, after training), each at the literature's default hyperparameters (the sweep
config's docstring). With --quick too, the IID set is halved. Each baseline's worst-group
accuracy is reported against ERM's (`bgjax.findings`), with a reason where it is not higher.

Everything runs in this process, with JAX's persistent compilation cache in WORKDIR/jax_cache,
so runs that compile the same program (the baseline and mixed_rand train steps, every eval of
one model) compile once. Rerunning skips finished runs and evaluations and resumes an
interrupted training run from its checkpoint. `bgjax aggregate WORKDIR` tabulates the same runs
as any sweep's (the DFR run as a DFR copy of the ERM run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from etils import epath

from bgjax import aggregate, clflags, config_utils, dfr, plots, sweep, xla_options
from bgjax import data as data_lib
from bgjax import findings as findings_lib
from bgjax import metrics as metrics_lib
from bgjax import workdir as workdir_lib
from bgjax.tasks import jtt

SWEEP = "sweeps/demo.py"


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


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent cache, unless the user configured one: identical programs (the same
    model under another training variant, each eval of one model) then compile once."""
    xla_options.enable_compilation_cache(directory)


def jobs(
    workdir: str, *, quick: bool = False, baselines: bool = False
) -> tuple[ml_collections.ConfigDict, list]:
    """The demo's sweep config and its jobs, rooted at `workdir`."""
    arg = f"quick={quick}" + (",baselines=True" if baselines else "")
    config = config_utils.load_config(f"{SWEEP}:{arg}")
    return config, sweep.expand(config, root=workdir)


def scored_runs(sweep_config: ml_collections.ConfigDict, demo_jobs: Sequence[sweep.Job]) -> list:
    """(run name, {axis: point}, evals) of every run the demo evaluates: the jobs with evals,
    then the DFR runs (scored with the sweep's evals)."""
    runs = [(j.name, dict(j.points), j.evals) for j in demo_jobs if j.evals]
    evals = tuple(dict(e) for e in sweep_config.evals)
    return runs + [(d["name"], dict(d["points"]), evals) for d in sweep_config.get("dfr", ())]


def run_dfr(workdir: str, sweep_config: ml_collections.ConfigDict) -> dict[str, dict]:
    """The sweep's `dfr` runs (`bgjax.dfr.run_dfr` of a trained run), skipped when done:
    {name: {"trained", "wall_s", "cpu_s"}} as `sweep.run_local`'s."""
    done = {}
    for spec in sweep_config.get("dfr", ()):
        wall, cpu = time.perf_counter(), sweep.cpu_seconds()
        source, out = (os.path.join(workdir, spec[k]) for k in ("run", "name"))
        fitted = (epath.Path(out) / dfr.DFR_FILE).exists() and (
            workdir_lib.latest_step(out) == workdir_lib.latest_step(source)
        )
        if not fitted:
            dfr.run_dfr(source, out, split=spec["split"])
        done[spec["name"]] = dict(
            trained=not fitted, wall_s=time.perf_counter() - wall, cpu_s=sweep.cpu_seconds() - cpu
        )
    return done


def run_demo(
    workdir: str | os.PathLike,
    *,
    quick: bool = False,
    baselines: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (`sweep.run_local`, then the DFR runs) and evaluate the demo's runs, check the
    findings, write the summary; returns summary.json's content. Raises `sweep.Interrupted` at a
    preemption."""
    import tqdm

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    sweep_config, demo_jobs = jobs(workdir, quick=quick, baselines=baselines)
    sweep.write_manifest(workdir, sweep_config, demo_jobs)  # `bgjax aggregate` reads it
    start_wall, start_cpu = time.perf_counter(), sweep.cpu_seconds()
    timing = sweep.run_local(workdir, demo_jobs, progress=progress)
    timing.update(run_dfr(workdir, sweep_config))
    results: dict[str, dict[str, dict]] = {}
    sources, scored = SourceCache(), scored_runs(sweep_config, demo_jobs)
    for name, points, run_evals in tqdm.tqdm(
        scored, desc="evaluate", unit="run", disable=not progress
    ):
        wall, cpu = time.perf_counter(), sweep.cpu_seconds()
        specs = [aggregate.EvalSpec.parse(e) for e in run_evals]
        evals = aggregate.evaluate_run(os.path.join(workdir, name), specs, get_source=sources)
        results.setdefault(points["arch"], {})[points["strategy"]] = evals
        timing[name]["wall_s"] += time.perf_counter() - wall
        timing[name]["cpu_s"] += sweep.cpu_seconds() - cpu
        logging.info("demo: %s done (%s)", name, timing[name])
    timing["total"] = dict(
        wall_s=time.perf_counter() - start_wall, cpu_s=sweep.cpu_seconds() - start_cpu
    )
    methods = baseline_settings(workdir, sweep_config, demo_jobs) if baselines else None
    summary = summarize(
        results, [j for j in demo_jobs if j.evals], quick=quick, timing=timing, methods=methods
    )
    write_summary(workdir, summary)
    return summary


def baseline_settings(
    workdir: str, sweep_config: ml_collections.ConfigDict, demo_jobs: Sequence[sweep.Job]
) -> dict[str, dict[str, Any]]:
    """{arch: {method: its settings}} of the baselines, read from the runs: sampling, Group
    DRO's eta and adjustment, JTT's identification steps, upweight and error-set size, DFR's
    held-out split and chosen C."""
    out: dict[str, dict[str, Any]] = {}
    for job in demo_jobs:
        points, config = dict(job.points), job.config()
        method, settings = points.get("strategy"), None
        if method == "group_balanced":
            settings = dict(sampling=config.data.sampling)
        elif method == "group_dro":
            settings = config.loss.group_dro.to_dict()
        elif method == "jtt":
            errors_of = config.data.upweight.errors_of
            errors = json.loads((epath.Path(errors_of) / jtt.ERROR_SET_FILE).read_text())
            settings = dict(
                identification_steps=workdir_lib.read_config(errors_of).total_steps,
                upweight=config.data.upweight.factor,
                upweighted_examples=len(errors["indices"]),
                train_examples=errors["num_examples"],
            )
        if settings is not None:
            out.setdefault(points["arch"], {})[method] = settings
    for spec in sweep_config.get("dfr", ()):
        record = json.loads((epath.Path(workdir) / spec["name"] / dfr.DFR_FILE).read_text())
        keys = ("split", "c", "fit_examples", "tune_examples")
        settings = {k: record[k] for k in keys}
        settings["tune_worst_group"] = record["tune_worst_group_accuracy"][str(record["c"])]
        out.setdefault(spec["points"]["arch"], {})["dfr"] = settings
    return out


# ---------------------------------------------------------------------------------------------
# Summary


def summarize(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    scored: Sequence[sweep.Job],
    *,
    quick: bool,
    timing: Mapping[str, Any],
    methods: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json: the settings (read from the runs' configs), each run's numbers, the
    findings and the timing; with --baselines (`methods`: `baseline_settings`), the baselines'
    settings too."""
    runs = {
        arch: {strategy: findings_lib.run_numbers(evals) for strategy, evals in by.items()}
        for arch, by in results.items()
    }
    baselines = {dict(j.points)["arch"]: j.config() for j in scored
                 if dict(j.points)["strategy"] == "baseline"}  # fmt: skip
    any_config = next(iter(baselines.values()))
    data = any_config.data
    chance = 1.0 / data.num_classes
    if methods is None:
        mode, extra = ("quick" if quick else "full"), {}
    else:
        mode, extra = ("quick, baselines" if quick else "baselines"), dict(methods=dict(methods))
    return dict(
        mode=mode,
        settings=dict(
            image_size=data.image_size,
            train_size=data.train_size,
            batch_size=any_config.batch_size,
            steps={arch: c.total_steps for arch, c in baselines.items()},
            seed=any_config.seed,
        ),
        dataset=dict(
            name=data.name,
            num_classes=data.num_classes,
            bg_correlation=data.bg_correlation,
            seed=data.seed,
            chance=chance,
        ),
        models={arch: _model_summary(c) for arch, c in baselines.items()},
        runs=runs,
        findings=findings_lib.check(runs, chance),
        timing=dict(timing),
        **extra,
    )


def _model_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The baseline's model config (name + overrides of bgjax/configs/synthetic.py) and its size."""
    training_keys = (
        "masking",
        "frozen_backbone",
        "init",
        "dtype",
        "drop_path_rate",
        "kernels",
        "attention",
        "remat",
        "scan_blocks",
    )
    model = {k: v for k, v in config.model.to_dict().items() if k not in training_keys}
    return dict(model, params=aggregate.count_params(config, config.data.num_classes))


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
    steps = ", ".join(f"{n} ({arch})" for arch, n in s["steps"].items())
    parts = [
        f"# bgjax demo ({summary['mode']})",
        "",
        f"Synthetic shapes on habitats: {ds['num_classes']} classes (chance "
        f"{_pct(ds['chance'])}%), habitat = class in {_pct(ds['bg_correlation'])}% of the "
        f"training images; {s['image_size']} px, {s['train_size']} training images, batch "
        f"{s['batch_size']}, steps: {steps}, seed {s['seed']}.",
        "",
        f"Models (tiny custom widths, so the demo fits a 2-core CPU): {models}.",
        "",
        f"IID test: {any_run['iid_images']} images under each of the 8 variants (BG-gap = "
        f"MIXED_SAME − MIXED_RAND). Balanced (OOD) test: {any_run['ood_images']} images, "
        f"habitat independent of the class, ≥ {any_run['ood_smallest_group']} per label × "
        "habitat group (worst-group accuracy; OOD avg = groups weighted by their training "
        "share). Accuracies in %.",
        "",
        *_methods_markdown(summary.get("methods")),
        table_markdown(summary),
        "",
        "## Findings (measured)",
        "",
        *findings_lib.markdown(summary["findings"]),
        "",
        f"Time: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (user + sys).",
        "",
        "Plots: accuracy_per_variant.png, bg_gap_worst_group.png, variants.png.",
        "",
    ]
    return "\n".join(parts)


def _methods_markdown(methods: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """The baselines' settings (--baselines), a paragraph before the table."""
    if not methods:
        return []
    lines = ["baseline = ERM. The field's baselines, at fixed literature defaults (not tuned):"]
    for arch, by in methods.items():
        for method, settings in by.items():
            text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
            lines.append(f"- {arch} {method}: {text}")
    return [*lines, ""]


def write_summary(workdir: str, summary: Mapping[str, Any]) -> dict[str, str]:
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
    lowest = min(r[key] for by in runs.values() for r in by.values() for key in metrics.values())
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
        ylim=(min(0.0, 100 * lowest) - 3, 100),  # one scale: the panels are compared
    )
    _variant_grid(paths["grid"], summary["dataset"], summary["settings"]["image_size"])
    return paths


def _variant_grid(path: str, dataset: Mapping[str, Any], image_size: int) -> str:
    """The eight variants of a few training images (`bgjax show-variants`'s picture)."""
    from bgjax import show_variants  # a command module: imported only when drawing

    keys = ("name", "num_classes", "bg_correlation", "seed")
    config = ml_collections.ConfigDict(dict({k: dataset[k] for k in keys}, image_size=image_size))
    source = data_lib.get_source(config, "train")
    return plots.variant_grid(show_variants.variant_rows(source, 6, dataset["seed"]), path)


# ---------------------------------------------------------------------------------------------
# Command line

_WORKDIR = clflags.string("workdir", None, "Where the runs and the summary go.")
_QUICK = clflags.boolean(
    "quick", False, "ConvNeXt runs only, no segmenter, smaller IID set (~5 min on 2 cores)."
)
_BASELINES = clflags.boolean(
    "baselines",
    False,
    "ConvNeXt runs (no segmenter) plus group-balanced sampling, Group DRO, JTT and DFR of the "
    "ERM run, in one table.",
)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # the progress bars say what runs; logs go quiet
        logging.set_verbosity(logging.WARNING)
    suffix = ("_quick" if _QUICK.value else "") + ("_baselines" if _BASELINES.value else "")
    workdir = _WORKDIR.value or f"runs/demo{suffix}"
    try:
        summary = run_demo(workdir, quick=_QUICK.value, baselines=_BASELINES.value)
    except sweep.Interrupted as e:
        print(f"bgjax demo: {e}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax demo: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_markdown(summary))
    print(f"wrote {epath.Path(workdir) / 'summary.md'}")
