"""The paper's figures from a run, as PNGs: elite maps (figure 4), their development over
generations (figure 6), QD score / coverage / best quality curves (figure 5), and the time
each generation spent merging, transferring and evaluating.

Figures are drawn with matplotlib's object API on the Agg canvas, so no display and no
global pyplot state is involved. Elite maps show quality as colour over two behaviour axes
(K = 3), a bar per bin over the single axis (K = 2), or one panel per pair of axes with the
best quality over the others (K >= 4); the experts' cells are outlined in red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cqd_mpi.analysis.runstate import TIMING_PHASES, RunState, axis_pairs, project
from cqd_mpi.qd.archive import Archive

DPI = 100
PANEL_INCHES = 3.0
EMPTY_COLOUR = "#e8e8e8"
EXPERT_COLOUR = (1.0, 0.0, 0.0)
COLORMAP = "viridis"
TIMING_COLOURS = {"merge": "tab:blue", "transfer": "tab:orange", "eval": "tab:green", "other": "tab:gray"}


def new_figure(width: float, height: float):
    """A figure on its own Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write a figure to `path` (its folder made if needed); the analysis figures' one way out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _edge_labels(edges: np.ndarray) -> list[str]:
    return [f"{e:.3g}" for e in edges]


def _panels_per_archive(run: RunState) -> list[tuple[int, ...]]:
    """The axes each panel of an archive shows: the single axis (K = 2) or pairs of axes."""
    if run.k == 2:
        return [(0,)]
    return list(axis_pairs(run.k - 1))


def quality_range(archives: Sequence[Archive]) -> tuple[float, float]:
    """One colour scale for every snapshot of an archive, so colours compare across panels."""
    values = np.concatenate([a.quality[~np.isnan(a.quality)] for a in archives])
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.05, high + 0.05
    return low, high


def draw_archive(ax, run: RunState, archive: Archive, axes: tuple[int, ...], *,
                 vrange: tuple[float, float], title: str | None = None, colorbar: bool = True,
                 x_ticks: bool = True):
    """One panel: the archive over behaviour axis `axes` (one or two of its K-1 axes);
    `x_ticks=False` leaves the bin edges off the x axis (panels stacked over the same axis)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    cmap = quality_colormap()
    norm = quality_norm(vrange)
    quality_name = run.task_names[archive.quality_task]
    ax.set_facecolor(EMPTY_COLOUR)
    names = [run.task_names[archive.bc_tasks[a]] for a in axes]
    expert_cells = sorted({tuple(cell[a] for a in axes) for cell in run.expert_cells(archive)})
    values = project(archive.quality, axes)
    if len(axes) == 1:
        filled = ~np.isnan(values)
        ax.bar(np.arange(values.size)[filled], values[filled], width=1.0, align="edge",
               color=cmap(norm(values[filled])), edgecolor="black", linewidth=0.5)
        ax.set_xlim(0, values.size)
        ax.set_ylim(0, max(vrange[1], 1e-9) * 1.1)
        ax.set_ylabel(f"quality: {quality_name}")
        column = blended_transform_factory(ax.transData, ax.transAxes)
        for (i,) in expert_cells:
            ax.add_patch(Rectangle((i, 0.0), 1.0, 1.0, transform=column, fill=False,
                                   edgecolor=EXPERT_COLOUR, linewidth=2.5, clip_on=False))
        mappable = ScalarMappable(norm=norm, cmap=cmap)
    else:
        masked = np.ma.masked_invalid(values.T)
        mappable = ax.pcolormesh(np.arange(values.shape[0] + 1), np.arange(values.shape[1] + 1), masked,
                                 cmap=cmap, norm=norm, edgecolors="white", linewidth=0.3)
        for i, j in expert_cells:
            ax.add_patch(Rectangle((i, j), 1.0, 1.0, fill=False, edgecolor=EXPERT_COLOUR, linewidth=2.5,
                                   clip_on=False))
        ax.set_aspect("equal")
        y_bins = archive.bins[axes[1]]
        ax.set_yticks(np.arange(y_bins.n_bins + 1), _edge_labels(y_bins.edges()), fontsize=7)
        ax.set_ylabel(names[1])
    x_bins = archive.bins[axes[0]]
    if x_ticks:
        ax.set_xticks(np.arange(x_bins.n_bins + 1), _edge_labels(x_bins.edges()), fontsize=7, rotation=90)
        ax.set_xlabel(names[0])
    else:
        ax.set_xticks(np.arange(x_bins.n_bins + 1), [])
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(mappable, ax=ax, label=quality_name, shrink=0.8)


def quality_colormap():
    """The colour map of quality in every elite map."""
    import matplotlib

    return matplotlib.colormaps[COLORMAP]


def quality_norm(vrange: tuple[float, float]):
    """Quality to [0, 1] for the colour map, over one archive's range."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=vrange[0], vmax=vrange[1])


def elite_maps(run: RunState, archives: Sequence[Archive], generation: int, path: Path) -> Path:
    """Figure 4: every archive at one generation; for K >= 4 a row of pair panels per archive."""
    panels = _panels_per_archive(run)
    if len(panels) == 1:
        rows, columns = 1, run.k
    else:
        rows, columns = run.k, len(panels)
    figure = new_figure(PANEL_INCHES * 1.25 * columns, PANEL_INCHES * rows + 0.4)
    axes = np.atleast_2d(figure.subplots(rows, columns, squeeze=False))
    for q, archive in enumerate(archives):
        vrange = quality_range([archive])
        for p, pair in enumerate(panels):
            ax = axes[0, q] if len(panels) == 1 else axes[q, p]
            title = f"archive {run.task_names[q]}"
            if len(pair) == 2 and run.k > 3:
                title += " (best over other axes)"
            draw_archive(ax, run, archive, pair, vrange=vrange, title=title)
    figure.suptitle(f"Elite maps at generation {generation} (red: the experts' cells)", fontsize=11)
    return save_figure(figure, path)


def elite_map_strip(run: RunState, snapshots: dict[int, list[Archive]], path: Path) -> Path:
    """Figure 6: the archives (columns) at several generations (rows), one colour scale per archive."""
    panels = _panels_per_archive(run)
    generations = sorted(snapshots)
    columns = [(q, pair) for q in range(run.k) for pair in panels]
    figure = new_figure(PANEL_INCHES * len(columns) + 0.6, PANEL_INCHES * len(generations) + 0.4)
    axes = figure.subplots(len(generations), len(columns), squeeze=False)
    ranges = [quality_range([snapshots[g][q] for g in generations]) for q in range(run.k)]
    for row, generation in enumerate(generations):
        for column, (q, pair) in enumerate(columns):
            ax = axes[row, column]
            title = f"{run.task_names[q]}" if row == 0 else None
            last_row = row == len(generations) - 1
            draw_archive(ax, run, snapshots[generation][q], pair, vrange=ranges[q], title=title,
                         colorbar=last_row, x_ticks=last_row)
            if column == 0:
                ax.annotate(f"gen {generation}", xy=(-0.45, 0.5), xycoords="axes fraction", rotation=90,
                            ha="center", va="center", fontsize=11, fontweight="bold")
    figure.suptitle("Archives over generations (red: the experts' cells)", fontsize=11)
    return save_figure(figure, path)


def strip_generations(last: int, rows: int = 5) -> list[int]:
    """Evenly spaced generations from 0 to `last`, both included, at most `rows` of them."""
    return sorted({round(g) for g in np.linspace(0, last, min(rows, last + 1))})


def progress_curves(run: RunState, until: int, path: Path) -> Path:
    """Figure 5: QD score, coverage and best quality of every archive over generations."""
    progress = run.progress(until)
    figure = new_figure(13.0, 3.8)
    axes = figure.subplots(1, 3)
    marker = "o" if len(progress.generation) <= 40 else None
    series = (("QD score", progress.qd_score), ("coverage (%)", 100.0 * progress.coverage),
              ("best quality", progress.best_quality))
    for ax, (label, values) in zip(axes, series):
        for q, name in enumerate(run.task_names):
            ax.plot(progress.generation, values[:, q], marker=marker, markersize=3, label=f"archive {name}")
        ax.set_xlabel("generation")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Progress up to generation {until}", fontsize=11)
    return save_figure(figure, path)


def time_breakdown(run: RunState, until: int, path: Path) -> Path:
    """Seconds per generation: merge, transfer and eval stacked, the rest of the total on top
    (bars for a few generations, a stacked area for many)."""
    timings = run.timings(until)
    figure = new_figure(10.0, 4.0)
    ax = figure.subplots()
    generation = timings["generation"]
    parts = [*TIMING_PHASES, "other"]
    values = {key: np.nan_to_num(timings[key]) for key in TIMING_PHASES}
    values["other"] = np.clip(np.nan_to_num(timings["total"]) - sum(values.values()), 0.0, None)
    colours = [TIMING_COLOURS[key] for key in parts]
    labels = ["other (save, checkpoint, wait)" if key == "other" else key for key in parts]
    few = len(generation) <= 60
    if few:
        bottom = np.zeros(len(generation))
        for key, colour, label in zip(parts, colours, labels):
            ax.bar(generation, values[key], bottom=bottom, width=0.8, color=colour, label=label)
            bottom = bottom + values[key]
    else:
        ax.stackplot(generation, *(values[key] for key in parts), colors=colours, labels=labels, step="mid")
    ax.plot(generation, timings["total"], color="black", marker="." if few else None, linewidth=1, label="total")
    ax.set_xlabel("generation")
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if not len(generation):
        ax.text(0.5, 0.5, "no generation finished yet", transform=ax.transAxes, ha="center")
    ax.set_title(f"Time per generation up to generation {until}", fontsize=11)
    return save_figure(figure, path)


def render_all(run: RunState, out_dir: str | Path, *, generation: int | None = None) -> list[Path]:
    """Every figure of `analyze`, as of `generation` (default: the last checkpointed one).

    Files are named elite_maps.png, elite_maps_over_generations.png, progress.png and
    time_breakdown.png, with a _gen<G> suffix when a generation is asked for.
    """
    out_dir = Path(out_dir)
    until = run.check_generation(generation)
    suffix = "" if generation is None else f"_gen{until}"
    strip = strip_generations(until)
    snapshots = run.archives_at(strip)
    return [
        elite_maps(run, snapshots[until], until, out_dir / f"elite_maps{suffix}.png"),
        elite_map_strip(run, snapshots, out_dir / f"elite_maps_over_generations{suffix}.png"),
        progress_curves(run, until, out_dir / f"progress{suffix}.png"),
        time_breakdown(run, until, out_dir / f"time_breakdown{suffix}.png"),
    ]
