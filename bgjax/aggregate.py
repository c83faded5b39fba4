r"""`bgjax aggregate ROOT`: evaluate what a sweep left unevaluated, then tabulate and plot it.

    bgjax aggregate runs/tiny            # after `bgjax sweep ... --workdir runs/tiny`

Every run folder under ROOT (one with a config.json) is evaluated at its newest checkpoint with
the sweep's `evals` (ROOT/sweep.json; default: all variants on the dataset's test split), by
the evaluator, into RUN/eval/step_<N>/<eval name>/results.json. Results already there are read,
not recomputed. Written to ROOT:

    aggregate.json / aggregate.md   one row per run: model, parameters, strategy, seed, metrics
    scaling.png                     each variant's / OOD split's accuracy against model size
                                    (parameters, counted abstractly), one line per arch+strategy
                                    (seeds averaged, min-max bars): the masking paper's figures
    progress_vs_background.png      original accuracy against BG-gap and against MIXED_RAND
                                    accuracy, one point per run ("Noise or Signal", Fig. 6)
    selection.json (+ a section of aggregate.md), when the sweep has a `selection` key: each
                                    method's hyperparameters chosen by a validation metric, then
                                    its test metrics as mean ± std over seeds (`bgjax.selection`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, logging
from etils import epath
from flax import nnx

from bgjax import data as data_lib
from bgjax import dfr, plots, tasks
from bgjax import metrics as metrics_lib
from bgjax import selection as selection_lib
from bgjax import variants as variants_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline

SourceFn = Callable[[ml_collections.ConfigDict, str], Any]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluation of every run: a split, its variants, and config.data changes."""

    name: str
    split: str
    variants: tuple[str, ...] = variants_lib.VARIANTS
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> EvalSpec:
        unknown = set(spec) - {"name", "split", "variants", "data"}
        if unknown or "name" not in spec or "split" not in spec:
            raise ValueError(
                f"eval spec {dict(spec)} needs name and split (optional: variants, data); "
                f"unknown keys: {sorted(unknown)}"
            )
        return cls(
            name=spec["name"],
            split=spec["split"],
            variants=variants_lib.parse(spec.get("variants")),
            data=dict(spec.get("data") or {}),
        )


def default_evals(config: ml_collections.ConfigDict) -> list[EvalSpec]:
    return [EvalSpec("test", data_lib.default_split(config.data.name))]


def results_path(workdir: str | os.PathLike, step: int, name: str) -> epath.Path:
    return epath.Path(workdir_lib.eval_dir(workdir, step)) / name / "results.json"


def evaluate_run(
    workdir: str | os.PathLike,
    evals: Sequence[EvalSpec],
    *,
    step: int | None = None,
    get_source: SourceFn = data_lib.get_source,
    batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{eval name: results.json content} of `workdir`'s checkpoint `step` (default newest),
    reading results that exist and evaluating the others (the model is restored once)."""
    step = workdir_lib.latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {epath.Path(workdir) / 'checkpoints'}")
    out, missing = {}, []
    for spec in evals:
        path = results_path(workdir, step, spec.name)
        if path.exists():
            out[spec.name] = json.loads(path.read_text())
        else:
            missing.append(spec)
    if not missing:
        return out
    config, sources = workdir_lib.read_config(workdir), {}
    for spec in missing:  # every source checked before the model is restored
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.update(spec.data)
        sources[spec.name] = data, get_source(data, spec.split)
        command = f"evaluation {spec.name!r} of {workdir}"
        tasks.require_masks(sources[spec.name][1], spec.variants, config, command=command)
    run = workdir_lib.restore(workdir, step)
    for spec in missing:
        data, source = sources[spec.name]
        results = dict(run.metadata(), split=spec.split, eval=spec.name)
        results.update(
            tasks.score(
                run,
                source,
                spec.variants,
                image_size=data.image_size,
                eval_resize=pipeline.EvalResize.from_config(data),
                with_gt_masks=False,
                batch_size=batch_size or run.config.eval.batch_size,
            )  # fmt: skip
        )
        tasks.write_results(results, results_path(workdir, step, spec.name).parent)
        out[spec.name] = results
    return out


# ---------------------------------------------------------------------------------------------
# Describing runs


def count_params(config: ml_collections.ConfigDict, num_classes: int) -> int:
    """Parameters of the run's model, from shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: tasks.make_model(config, num_classes))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def strategy_of(config: ml_collections.ConfigDict) -> str:
    """none | mixed_rand (or another training variant) | early | late | attn, "+pred" when the
    masks come from a segmenter."""
    masking = config.model.get("masking", "none")
    if masking != "none":
        return masking if config.get("mask_source", "gt") == "gt" else f"{masking}+pred"
    variant = config.get("train_variant", "original")
    if not isinstance(variant, str):
        return "mixed_variants"
    return "none" if variant == "original" else variant


def family_of(model_name: str) -> str:
    return model_name.split("_")[0]


def describe_run(workdir: str | os.PathLike) -> dict[str, Any]:
    workdir = epath.Path(workdir)
    config = workdir_lib.read_config(workdir)
    classes = workdir_lib.read_info(workdir).class_names
    return dict(
        run=workdir.name,
        model=config.model.name,
        family=family_of(config.model.name),
        params=count_params(config, len(classes)),
        strategy=strategy_of(config),
        seed=config.seed,
        total_steps=config.total_steps,
    )


def run_dirs(root: str | os.PathLike) -> list[epath.Path]:
    root = epath.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep root {root} does not exist")
    return sorted(p for p in root.iterdir() if workdir_lib.is_run(p))


def load_points(root: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{run name: {axis: point name}} from ROOT/sweep.json ({} without a manifest)."""
    manifest = epath.Path(root) / "sweep.json"
    if not manifest.exists():
        return {}
    return {run["name"]: run["points"] for run in json.loads(manifest.read_text())["runs"]}


def dfr_source(workdir: epath.Path) -> str | None:
    """The folder name of the run that `workdir` is a DFR copy of (its dfr.json), or None."""
    record = workdir / dfr.DFR_FILE
    return epath.Path(json.loads(record.read_text())["source"]).name if record.exists() else None


def load_evals(root: str | os.PathLike) -> dict[str, list[EvalSpec] | None]:
    """{run name: its eval specs} from ROOT/sweep.json (None: the default evaluation; []: not
    evaluated, e.g. a segmenter stage's run); {} when there is no manifest."""
    manifest = epath.Path(root) / "sweep.json"
    if not manifest.exists():
        return {}
    manifest = json.loads(manifest.read_text())
    default = manifest["sweep"].get("evals")
    by_run = {}
    for run in manifest["runs"]:
        specs = run.get("evals", default)
        by_run[run["name"]] = None if specs is None else [EvalSpec.parse(s) for s in specs]
    return by_run


# ---------------------------------------------------------------------------------------------
# The table


def metrics_of(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The flat metrics of one results.json: each variant's accuracy (a segmenter's: foreground
    and mean IoU), BG-gap, groups."""
    out = {}
    for variant, r in results["variants"].items():
        if "accuracy" in r:
            out[variant] = r["accuracy"]
        else:
            out.update({f"{variant} {m}": r[m] for m in ("fg_iou", "miou") if m in r})
    for key in ("bg_gap", "worst_group_accuracy", "average_accuracy"):
        if results.get(key) is not None:
            out[key] = results[key]
    return out


def collect(
    root: str | os.PathLike, *, evals: Sequence[EvalSpec] | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """One row per finished run, in the sweep's order (ROOT/sweep.json; other runs after, by
    name): its description and {eval name: metrics}. A DFR copy of a sweep's run (`bgjax dfr
    --out ROOT/<name>`) takes that run's evaluations and points and follows it, with `dfr_of`
    naming it (its method becomes "dfr+<method>" in the selection)."""
    import tqdm

    by_run, points = load_evals(root), load_points(root)
    rows = []
    for workdir in tqdm.tqdm(run_dirs(root), desc="aggregate", unit="run", disable=not progress):
        dfr_of = dfr_source(workdir)
        name = dfr_of if workdir.name not in points and dfr_of in points else workdir.name
        specs = evals if evals is not None else by_run.get(name)
        if specs == []:
            logging.info("aggregate: %s has no evaluations in sweep.json, left out", workdir)
            continue
        row = describe_run(workdir)
        step = workdir_lib.latest_step(workdir)
        if step is None or step < row["total_steps"]:
            logging.warning("aggregate: %s is unfinished (step %s), left out", workdir, step)
            continue
        specs = specs or default_evals(workdir_lib.read_config(workdir))
        results = evaluate_run(workdir, specs, step=step)
        row["step"] = step
        row["points"] = points.get(name, {})
        if name != workdir.name:
            row["dfr_of"] = name
        row["metrics"] = {name: metrics_of(r) for name, r in results.items()}
        rows.append(row)
    grid = {name: i for i, name in enumerate(points)}  # the sweep's order; DFR copies after
    return sorted(rows, key=lambda r: (grid.get(r.get("dfr_of", r["run"]), len(grid)),
                                       "dfr_of" in r))  # fmt: skip


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown table per evaluation: a row per run, a column per metric (%)."""
    parts = ["# Sweep results", ""]
    evals = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    for name in evals:
        columns = list(dict.fromkeys(m for row in rows for m in row["metrics"].get(name, {})))
        parts += [f"## {name}", ""]
        parts.append("| run | model | params (M) | strategy | seed | " + " | ".join(columns) + " |")
        parts.append("|---|---|---:|---|---:|" + "---:|" * len(columns))
        for row in rows:
            metrics = row["metrics"].get(name, {})
            cells = [metrics_lib.pct(metrics.get(c)) for c in columns]
            parts.append(
                f"| {row['run']} | {row['model']} | {row['params'] / 1e6:.2f} | "
                f"{row['strategy']} | {row['seed']} | " + " | ".join(cells) + " |"
            )
        parts.append("")
    return "\n".join(parts)


def write_outputs(
    root: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    selection: selection_lib.Selection | None = None,
) -> dict[str, str]:
    """aggregate.json, aggregate.md, the two plots and, with a `selection`, selection.json."""
    root = epath.Path(root)
    paths = {k: os.fspath(root / f) for k, f in (
        ("json", "aggregate.json"), ("md", "aggregate.md"), ("scaling", "scaling.png"),
        ("progress", "progress_vs_background.png"))}  # fmt: skip
    (root / "aggregate.json").write_text(json.dumps(list(rows), indent=2))
    markdown = table_markdown(rows)
    if selection is not None:
        chosen = selection_lib.select(rows, selection)
        paths["selection"] = os.fspath(root / "selection.json")
        record = dict(selection=dataclasses.asdict(selection), methods=chosen)
        (root / "selection.json").write_text(json.dumps(record, indent=2))
        markdown += "\n" + selection_lib.selection_markdown(chosen, selection)
    (root / "aggregate.md").write_text(markdown)
    if not rows:
        return {k: paths[k] for k in ("json", "md")}
    series = lambda row: f"{row['family']} {row['strategy']}"
    panels: dict[str, dict[str, list]] = {}
    for row in rows:
        for name, metrics in row["metrics"].items():
            for metric, value in metrics.items():
                if value is not None:
                    panel = panels.setdefault(f"{name}: {metric}", {})
                    panel.setdefault(series(row), []).append((row["params"], value))
    plots.metric_vs_size(panels, paths["scaling"])
    first = next(iter(rows[0]["metrics"]))  # the IID evaluation, by the sweep's order
    scatter = {}
    for y_metric, y_label in (("bg_gap", "BG-gap (%)"), ("mixed_rand", "MIXED_RAND accuracy (%)")):
        points: dict[str, list] = {}
        for row in rows:
            metrics = row["metrics"].get(first, {})
            if metrics.get("original") is not None and metrics.get(y_metric) is not None:
                points.setdefault(series(row), []).append((metrics["original"], metrics[y_metric]))
        if points:
            scatter[y_label] = points
    if scatter:
        plots.accuracy_scatter(scatter, paths["progress"], xlabel="ORIGINAL accuracy (%)")
    else:
        del paths["progress"]
    return paths


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: bgjax aggregate ROOT")
    try:
        selection = selection_lib.Selection.from_manifest(argv[1])
        rows = collect(argv[1])
        paths = write_outputs(argv[1], rows, selection)
    except (FileNotFoundError, ValueError) as e:
        print(f"bgjax aggregate: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(epath.Path(paths["md"]).read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()))
