"""`python -m cqd_mpi analyze RUN_DIR`: summary on stdout, PNGs under RUN_DIR/plots, clear errors."""

import shutil

import h5py
import matplotlib.image
import pytest

from cqd_mpi.cli import main
from tests.analysis.runs import GENERATIONS, finished_run, interrupted_run

FILES = ("elite_maps.png", "elite_maps_over_generations.png", "progress.png", "time_breakdown.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_family):
    return finished_run(tmp_path_factory, tiny_family, 3)


def test_analyze_prints_the_summary_and_writes_the_plots(run_dir, tmp_path, capsys):
    assert main(["analyze", str(run_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"generation {GENERATIONS} of {GENERATIONS}" in out and "CycleQD aggregate" in out
    assert "Lineage of the elites" in out
    for name in FILES:
        assert f"wrote {tmp_path / name}" in out
        assert matplotlib.image.imread(tmp_path / name)[..., :3].std() > 0.1


def test_analyze_a_run_in_progress_writes_into_its_plots_dir(tmp_path, tiny_family, capsys):
    run = interrupted_run(tmp_path, tiny_family, after_generation=2)
    assert main(["analyze", str(run), "--generation", "1"]) == 0
    out = capsys.readouterr().out
    assert "in progress, analysed up to its last checkpoint" in out and "generation 1 of 8" in out
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f.replace(".png", "_gen1.png") for f in FILES)


def test_summary_only(run_dir, capsys):
    assert main(["analyze", str(run_dir), "--no-plots", "--generation", "0"]) == 0
    out = capsys.readouterr().out
    assert "generation 0 of" in out and "wrote" not in out


def test_a_run_still_in_its_initial_evaluations_has_no_plots_yet(tmp_path, tiny_family, capsys):
    run = interrupted_run(tmp_path, tiny_family, after_generation=0, phase="init")
    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no archives yet (phase init)" in out and "no plots yet: the run is in phase init" in out
    assert not (run / "plots").exists()


@pytest.mark.parametrize("args, message", [
    (["--generation", "99"], f"--generation: expected a generation in 0..{GENERATIONS}"),
    (["--lineage-depth", "-1"], "--lineage-depth: expected an integer >= 0, got -1"),
])
def test_bad_options(run_dir, capsys, args, message):
    assert main(["analyze", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_no_such_run_dir(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert f"cqd_mpi: error: run dir {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_a_state_of_another_schema_version(run_dir, tmp_path, capsys):
    shutil.copyfile(run_dir / "state.h5", tmp_path / "state.h5")
    with h5py.File(tmp_path / "state.h5", "r+") as f:
        f.attrs["schema_version"] = 7
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "state.h5 has state schema version 7; this cqd_mpi" in err and "reads version 1" in err
