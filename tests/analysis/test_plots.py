"""The analysis figures, rendered from small real runs with K = 2, 3 and 4 tasks."""

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from cqd_mpi.analysis import plots
from cqd_mpi.analysis.runstate import RunState
from tests.analysis.runs import GENERATIONS, finished_run

FILES = ("elite_maps.png", "elite_maps_over_generations.png", "progress.png", "time_breakdown.png")


@pytest.fixture(scope="module", params=[2, 3, pytest.param(4, marks=pytest.mark.slow)], ids=lambda k: f"K{k}")
def run(request, tmp_path_factory, tiny_family):
    return RunState.load(finished_run(tmp_path_factory, tiny_family, request.param))


@pytest.fixture(scope="module")
def rendered(run, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"plots-k{run.k}")
    return run, plots.render_all(run, out)


def red_pixels(image: np.ndarray) -> int:
    rgb = image[..., :3]
    return int(np.count_nonzero((rgb[..., 0] > 0.95) & (rgb[..., 1] < 0.05) & (rgb[..., 2] < 0.05)))


def expected_size(figure_inches: tuple[float, float]) -> tuple[int, int]:
    width, height = figure_inches
    return round(height * plots.DPI), round(width * plots.DPI)


def test_every_figure_is_written_with_its_size_and_content(rendered):
    run, paths = rendered
    assert [p.name for p in paths] == list(FILES)
    panels = 1 if run.k <= 3 else 3
    rows, columns = (1, run.k) if panels == 1 else (run.k, panels)
    strip_rows = len(plots.strip_generations(GENERATIONS))
    sizes = {
        "elite_maps.png": (plots.PANEL_INCHES * 1.25 * columns, plots.PANEL_INCHES * rows + 0.4),
        "elite_maps_over_generations.png": (plots.PANEL_INCHES * run.k * panels + 0.6,
                                            plots.PANEL_INCHES * strip_rows + 0.4),
        "progress.png": (13.0, 3.8),
        "time_breakdown.png": (10.0, 4.0),
    }
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == expected_size(sizes[path.name]), path.name
        assert image[..., :3].std() > 0.1, f"{path.name} is blank"


def test_elite_maps_outline_the_experts_cells_in_red(rendered):
    _, paths = rendered
    by_name = {p.name: matplotlib.image.imread(p) for p in paths}
    assert red_pixels(by_name["elite_maps.png"]) > 200
    assert red_pixels(by_name["elite_maps_over_generations.png"]) > red_pixels(by_name["elite_maps.png"])
    assert red_pixels(by_name["progress.png"]) == 0 and red_pixels(by_name["time_breakdown.png"]) == 0


def draw_panel(run, archive, axes):
    figure = plots.new_figure(5.0, 5.0)
    ax = figure.subplots()
    vrange = plots.quality_range([archive])
    plots.draw_archive(ax, run, archive, axes, vrange=vrange)
    figure.canvas.draw()
    return ax, np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0, vrange


def pixel(buffer, ax, x, y):
    px, py = ax.transData.transform((x, y))
    return buffer[buffer.shape[0] - 1 - round(py), round(px)]


def has_red_near(buffer, ax, x, y, radius=3):
    """Whether a pure red pixel lies within `radius` pixels of the data point (x, y)."""
    px, py = ax.transData.transform((x, y))
    row, column = buffer.shape[0] - 1 - round(py), round(px)
    window = buffer[row - radius: row + radius + 1, column - radius: column + radius + 1]
    return bool(np.any(np.all(window == (1.0, 0.0, 0.0), axis=-1)))


def test_heatmap_cells_show_quality_as_colour_and_bin_edges_as_ticks(tmp_path_factory, tiny_family):
    run = RunState.load(finished_run(tmp_path_factory, tiny_family, 3))
    archive = run.stored_archives()[0]
    ax, buffer, vrange = draw_panel(run, archive, (0, 1))
    cmap, norm = plots.quality_colormap(), plots.quality_norm(vrange)
    experts = set(run.expert_cells(archive))
    for (i, j), quality in np.ndenumerate(archive.quality):
        colour = pixel(buffer, ax, i + 0.5, j + 0.5)
        expected = cmap(norm(quality))[:3] if not np.isnan(quality) else matplotlib.colors.to_rgb(plots.EMPTY_COLOUR)
        np.testing.assert_allclose(colour, expected, atol=2 / 255)
        if j == 0:
            continue
        assert has_red_near(buffer, ax, i + 0.5, j) == ((i, j) in experts or (i, j - 1) in experts), (i, j)
    edges = [f"{e:.3g}" for e in archive.bins[0].edges()]
    assert [t.get_text() for t in ax.get_xticklabels()] == edges
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{e:.3g}" for e in archive.bins[1].edges()]
    assert ax.get_xlabel() == run.task_names[archive.bc_tasks[0]]


def test_bar_chart_of_a_two_task_archive(tmp_path_factory, tiny_family):
    run = RunState.load(finished_run(tmp_path_factory, tiny_family, 2))
    archive = run.stored_archives()[1]
    ax, buffer, vrange = draw_panel(run, archive, (0,))
    heights = sorted(p.get_height() for p in ax.patches if p.get_facecolor()[3] > 0)
    assert heights == sorted(archive.quality[~np.isnan(archive.quality)].tolist())
    cmap, norm = plots.quality_colormap(), plots.quality_norm(vrange)
    for i, quality in enumerate(archive.quality):
        if not np.isnan(quality):
            np.testing.assert_allclose(pixel(buffer, ax, i + 0.5, quality / 2), cmap(norm(quality))[:3], atol=2 / 255)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{e:.3g}" for e in archive.bins[0].edges()]


def test_four_task_panels_show_the_best_over_the_other_axis(tmp_path_factory, tiny_family):
    run = RunState.load(finished_run(tmp_path_factory, tiny_family, 4))
    archive = run.stored_archives()[2]
    ax, buffer, vrange = draw_panel(run, archive, (0, 2))
    cmap, norm = plots.quality_colormap(), plots.quality_norm(vrange)
    best = np.nanmax(np.where(np.isnan(archive.quality), -1.0, archive.quality), axis=1)
    for (i, j), value in np.ndenumerate(best):
        if value >= 0:
            np.testing.assert_allclose(pixel(buffer, ax, i + 0.5, j + 0.5), cmap(norm(value))[:3], atol=2 / 255)
    assert ax.get_ylabel() == run.task_names[archive.bc_tasks[2]]


def test_maps_as_of_an_earlier_generation(rendered, tmp_path):
    run, latest = rendered
    paths = plots.render_all(run, tmp_path, generation=2)
    assert [p.name for p in paths] == [f.replace(".png", "_gen2.png") for f in FILES]
    early, late = (matplotlib.image.imread(p[0]) for p in (paths, latest))
    if not all(np.array_equal(a.occupant, b.occupant)
               for a, b in zip(run.archives_at([2])[2], run.stored_archives())):
        assert early.shape != late.shape or not np.array_equal(early, late)


def test_strip_generations():
    assert plots.strip_generations(8) == [0, 2, 4, 6, 8]
    assert plots.strip_generations(3) == [0, 1, 2, 3]
    assert plots.strip_generations(0) == [0]
    assert plots.strip_generations(1200) == [0, 300, 600, 900, 1200]
