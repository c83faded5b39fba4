"""Every bgjax picture, in one style.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, never pyplot): no
backend has to be chosen, nothing global is left open, and plotting from worker threads is safe.
A plot function builds its figure inside `style()` (rc parameters are read when artists are made)
and writes it with `save_figure`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

DPI = 100
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "image.interpolation": "nearest",  # show dataset pixels as they are, no smoothing
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The bgjax rc parameters, for building one figure."""
    with matplotlib.rc_context(STYLE):
        yield


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write `fig` (format from the suffix, e.g. .png/.pdf/.svg), creating parent folders."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# Grid geometry in inches: a square cell per image, a strip on the left for row labels and one on
# top for column titles. Axes are placed explicitly (no tight layout), so the saved size is exactly
# (LEFT + cols * CELL, TOP + rows * CELL) * DPI pixels.
GRID_CELL_IN = 1.2
GRID_LEFT_IN = 0.45  # room for two lines of vertical row label
GRID_TOP_IN = 0.3
_GRID_GAP = 0.04  # fraction of a cell left blank around each image


def variant_grid(
    rows: Sequence[tuple[str, Mapping[str, np.ndarray]]], out_path: str | os.PathLike
) -> str:
    """A grid of images: one row per `(row_label, {column_title: image})`, columns in the order of
    the first row's keys (every row must have the same keys). Images are uint8 [H, W, 3]."""
    if not rows:
        raise ValueError("variant_grid needs at least one row")
    columns = list(rows[0][1])
    for label, images in rows:
        if list(images) != columns:
            raise ValueError(f"row {label!r} has columns {list(images)}, expected {columns}")
    nrows, ncols = len(rows), len(columns)
    width = GRID_LEFT_IN + ncols * GRID_CELL_IN
    height = GRID_TOP_IN + nrows * GRID_CELL_IN
    cell_w, cell_h = GRID_CELL_IN / width, GRID_CELL_IN / height
    gap_w, gap_h = _GRID_GAP * cell_w, _GRID_GAP * cell_h
    with style():
        fig = Figure(figsize=(width, height))
        for r, (label, images) in enumerate(rows):
            for c, title in enumerate(columns):
                left = GRID_LEFT_IN / width + c * cell_w + gap_w
                bottom = 1 - GRID_TOP_IN / height - (r + 1) * cell_h + gap_h
                ax = fig.add_axes((left, bottom, cell_w - 2 * gap_w, cell_h - 2 * gap_h))
                ax.imshow(images[title])
                # Ticks and frame off by hand: ax.axis("off") would also hide the row label.
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if r == 0:
                    ax.set_title(title, pad=3)
                if c == 0:
                    ax.set_ylabel(label, labelpad=3, fontsize=8)
        return save_figure(fig, out_path)


def variant_accuracy_bars(
    series: Mapping[str, Mapping[str, float | None]],
    out_path: str | os.PathLike,
    *,
    ylabel: str = "accuracy (%)",
    chance: float | None = None,
) -> str:
    """Grouped bars: one group per key of the series' dicts (variants, in first-seen order), one
    bar per series (a model / run). Values are fractions in [0, 1]; None leaves a gap."""
    if not series:
        raise ValueError("variant_accuracy_bars needs at least one series")
    groups = list(dict.fromkeys(k for values in series.values() for k in values))
    n = len(series)
    width = 0.8 / n
    x = np.arange(len(groups))
    with style():
        fig = Figure(figsize=(max(4.0, 0.6 * len(groups) * max(1, n / 2) + 1.5), 3.2))
        ax = fig.add_subplot()
        for i, (label, values) in enumerate(series.items()):
            heights = [np.nan if values.get(g) is None else 100 * values[g] for g in groups]
            ax.bar(x - 0.4 + (i + 0.5) * width, heights, width, label=label)
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(x, groups, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel(ylabel)
        if n > 1 or chance is not None:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        elif n == 1:
            ax.set_title(next(iter(series)))
        fig.tight_layout()
        return save_figure(fig, out_path)


def saliency_overlays(
    images: np.ndarray,
    maps: Mapping[str, np.ndarray],
    out_path: str | os.PathLike,
    *,
    row_labels: Sequence[str] | None = None,
) -> str:
    """One row per image: the image, then each saliency map (normalised per image to its max)
    overlaid on it as a heat map. `images` uint8 [N, H, W, 3]; maps {name: float [N, H, W]}."""
    rows = []
    for i, image in enumerate(images):
        cells = {"image": image}
        for name, sal in maps.items():
            heat = np.asarray(sal[i], np.float32)
            heat = heat / heat.max() if heat.max() > 0 else heat
            colour = matplotlib.colormaps["inferno"](heat)[..., :3]
            cells[name] = (0.45 * image / 255.0 + 0.55 * colour).clip(0, 1)
        rows.append((row_labels[i] if row_labels is not None else str(i), cells))
    return variant_grid(rows, out_path)


# Multi-panel figures (demo and sweep summaries): a grid of small axes, one legend on the right
# shared by all panels, and the same colour for a series in every panel.
PANEL_IN = (3.2, 2.6)  # inches per panel (width, height)
LEGEND_ROW_IN = 0.3  # height of one row of the shared legend, above the panels
LEGEND_COLUMNS = 6
LEGEND_ENTRY_IN = 1.6  # width of one legend entry: fewer columns on narrow figures
MARKERS = "os^Dvx"  # per series, so that lines that coincide stay distinguishable


def _series_names(panels: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Every series of the panels, in first-seen order: their colours and markers follow it."""
    return list(dict.fromkeys(s for series in panels.values() for s in series))


def _panel_figure(
    panels: Mapping[str, Mapping[str, object]],
    out_path: str | os.PathLike,
    columns: int,
    draw,
    handle,
    panel_width: float = PANEL_IN[0],
) -> str:
    """Calls `draw(ax, title, series, colours)` per panel, then `handle(colour, name)` per
    series for the one legend, which runs across the top where every panel can be read
    against it, and saves."""
    if not panels:
        raise ValueError("a panel figure needs at least one panel")
    names = _series_names(panels)
    colours = {s: f"C{i % 10}" for i, s in enumerate(names)}
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    width = panel_width * columns
    legend_columns = max(1, min(len(names), LEGEND_COLUMNS, int(width / LEGEND_ENTRY_IN)))
    legend_in = LEGEND_ROW_IN * -(-len(names) // legend_columns) + 0.1
    with style():
        fig = Figure(figsize=(width, PANEL_IN[1] * rows + legend_in))
        for i, (title, series) in enumerate(panels.items()):
            draw(fig.add_subplot(rows, columns, i + 1), title, series, colours)
        fig.legend(
            handles=[handle(colours[s], s) for s in names],
            loc="upper center",
            ncol=legend_columns,
            fontsize=9,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / fig.get_figheight()))
        return save_figure(fig, out_path)


def _line_handle(colour: str, label: str, ls: str = "-"):
    return matplotlib.lines.Line2D([], [], color=colour, marker="o", ls=ls, label=label)


def bar_panels(
    panels: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    out_path: str | os.PathLike,
    *,
    ylabel: str = "accuracy (%)",
    columns: int = 2,
    ylim: tuple[float, float] | None = (0, 100),
    chance: float | None = None,
) -> str:
    """Grouped bars in several panels: {panel title: {series: {group: fraction}}} (None leaves
    a gap; a value of 0 is marked "0" so that it does not read as a gap). With `ylim=None`
    negative values (a BG-gap) stay visible; `chance` draws a line."""

    def draw(ax, title, series, colours):
        groups = list(dict.fromkeys(k for values in series.values() for k in values))
        x, width = np.arange(len(groups)), 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            heights = [np.nan if values.get(g) is None else 100 * values[g] for g in groups]
            positions = x - 0.4 + (i + 0.5) * width
            ax.bar(positions, heights, width, color=colours[label])
            for position, height in zip(positions, heights):
                if round(height, 1) == 0:  # a bar of no height: say it is 0, not missing
                    ax.annotate(
                        "0", (position, 0), xytext=(0, 1), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color=colours[label],
                    )  # fmt: skip
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, groups, rotation=30, ha="right")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    handle = lambda colour, label: matplotlib.patches.Patch(color=colour, label=label)
    bars = max(
        len(series) * len({g for values in series.values() for g in values})
        for series in panels.values()
    )
    width = max(PANEL_IN[0], 0.6 + 0.13 * bars)  # bars stay ~0.1 in wide, however many
    return _panel_figure(panels, out_path, columns, draw, handle, panel_width=width)


def metric_vs_size(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    out_path: str | os.PathLike,
    *,
    xlabel: str = "parameters",
    ylabel: str = "%",
    columns: int = 4,
) -> str:
    """Scaling curves: {panel title: {series: [(x, fraction), ...]}}, x on a log axis. Points
    of a series at the same x (seeds) are averaged, with min-max error bars. Every panel shares
    the percentage axis: from 0 (or the lowest value, for a negative BG-gap) to 100."""
    lowest = min(y for series in panels.values() for pts in series.values() for _, y in pts)
    names = _series_names(panels)
    y_range = (min(0.0, 100 * lowest) - 3, 103)

    def draw(ax, title, series, colours):
        for label, points in series.items():
            xs = sorted({x for x, _ in points})
            ys = [[100 * y for x2, y in points if x2 == x] for x in xs]
            mean = np.array([np.mean(v) for v in ys])
            err = np.array([[m - min(v), max(v) - m] for m, v in zip(mean, ys)]).T
            marker = MARKERS[names.index(label) % len(MARKERS)]
            ax.errorbar(xs, mean, yerr=err, color=colours[label], marker=marker, ms=4, capsize=2,
                        alpha=0.8)  # fmt: skip
        ax.set_ylim(*y_range)  # one scale for every panel: a flat 25% line looks flat
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    def handle(colour, label):
        marker = MARKERS[names.index(label) % len(MARKERS)]
        return matplotlib.lines.Line2D([], [], color=colour, marker=marker, label=label)

    return _panel_figure(panels, out_path, columns, draw, handle)


def accuracy_scatter(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    out_path: str | os.PathLike,
    *,
    xlabel: str,
    columns: int = 2,
) -> str:
    """One point per run: {panel y-label: {series: [(x, y) fractions]}}, e.g. original
    accuracy against BG-gap ("benchmark progress vs background dependence")."""

    def draw(ax, ylabel, series, colours):
        for label, points in series.items():
            xy = 100 * np.asarray(points, np.float64).reshape(-1, 2)
            # See-through, outlined markers: points that coincide show as darker, not hidden.
            ax.scatter(xy[:, 0], xy[:, 1], s=28, color=colours[label], alpha=0.55,
                       edgecolors="black", linewidths=0.5, zorder=3)  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)

    handle = lambda colour, label: _line_handle(colour, label, ls="")
    return _panel_figure(panels, out_path, columns, draw, handle)
