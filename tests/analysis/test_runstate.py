"""Reading runs for analysis: replayed archives, progress, lineage, summaries, runs in progress."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cqd_mpi.analysis.runstate import RunState, axis_pairs, project, summary
from cqd_mpi.errors import StateError
from tests.analysis.runs import GENERATIONS, finished_run, interrupted_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda k: f"K{k}")
def run_dir(request, tmp_path_factory, tiny_family):
    return finished_run(tmp_path_factory, tiny_family, request.param)


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tiny_family):
    return RunState.load(finished_run(tmp_path_factory, tiny_family, 3))


@pytest.fixture(scope="module")
def in_progress(tmp_path_factory, tiny_family):
    return interrupted_run(tmp_path_factory.mktemp("in-progress"), tiny_family, after_generation=3)


def assert_same_archives(replayed, stored):
    assert len(replayed) == len(stored)
    for a, b in zip(replayed, stored):
        np.testing.assert_array_equal(a.occupant, b.occupant)
        np.testing.assert_array_equal(a.quality, b.quality)
        np.testing.assert_array_equal(a.inserted, b.inserted)


def test_replay_at_the_last_generation_equals_the_stored_archives(run_dir):
    run = RunState.load(run_dir)
    assert run.phase == "done" and run.generations_done == GENERATIONS
    replayed = run.archives_at([GENERATIONS])[GENERATIONS]
    assert_same_archives(replayed, run.stored_archives())
    assert [a.shape for a in replayed] == [tuple(run.bins[t].n_bins for t in a.bc_tasks) for a in replayed]


def test_replayed_qd_score_and_coverage_equal_the_history(run_dir):
    run = RunState.load(run_dir)
    progress = run.progress()
    assert progress.generation.tolist() == list(range(GENERATIONS + 1))
    np.testing.assert_array_equal(progress.qd_score[1:], np.array([row.qd_score for row in run.history]))
    np.testing.assert_array_equal(progress.coverage[1:], np.array([row.coverage for row in run.history]))
    assert np.all(np.diff(progress.best_quality, axis=0) >= 0)
    assert np.all(np.diff(progress.coverage, axis=0) >= 0)
    for q in range(run.k):
        expert_cells = {tuple(c) for c in run.expert_cells(run.stored_archives()[q])}
        size = run.stored_archives()[q].occupant.size
        assert progress.coverage[0, q] == len(expert_cells) / size
        assert progress.best_quality[0, q] == max(run.scores[e][q] for e in run.expert_ids)


def test_past_archives_hold_only_models_of_their_time_and_only_improve(run3):
    snapshots = run3.archives_at(range(GENERATIONS + 1))
    for generation, archives in snapshots.items():
        for archive in archives:
            members = archive.members()
            assert all(run3.models[m].generation <= generation for m in members)
            assert all(run3.kinds[m] in ("expert", "child") for m in members)
    for generation in range(GENERATIONS):
        for before, after in zip(snapshots[generation], snapshots[generation + 1]):
            filled = before.occupant >= 0
            assert np.all(after.occupant[filled] >= 0)
            assert np.all(after.quality[filled] >= before.quality[filled])
            changed = after.occupant != before.occupant
            child = run3.history[generation].child_id
            assert set(after.occupant[changed].tolist()) <= {child}
    assert set(snapshots[0][0].members().tolist()) <= set(run3.expert_ids)


def test_experts_sit_in_their_cells_at_generation_zero(run3):
    archives = run3.archives_at([0])[0]
    for archive in archives:
        for expert, cell in zip(run3.expert_ids, run3.expert_cells(archive)):
            occupant = archive.occupant[cell]
            assert occupant in run3.expert_ids
            assert archive.quality[cell] >= run3.scores[expert][archive.quality_task]
            bc = [run3.scores[expert][t] for t in archive.bc_tasks]
            assert cell == tuple(b.index(v) for b, v in zip(archive.bins, bc))


def test_lineage_of_every_elite_ends_at_experts(run3):
    for archive in run3.stored_archives():
        elite = archive.elite()
        ancestors = run3.ancestors(elite)
        leaves = {m for m in ancestors | {elite} if not run3.parents(m)}
        assert leaves <= set(run3.expert_ids) and leaves
        assert all(run3.models[a].generation < run3.models[elite].generation or run3.kinds[elite] != "child"
                   for a in ancestors)
        lines = run3.lineage_lines(elite)
        assert lines[0].startswith(run3.describe(elite))
        printed = {m for m in ancestors | {elite} if any(run3.describe(m) in line for line in lines)}
        assert printed == ancestors | {elite}
        if run3.kinds[elite] == "child":
            p1, p2 = run3.parents(elite)
            assert run3.describe(p1) in lines[1]
            if p1 == p2:
                assert "both parents the same model" in lines[0]


def test_lineage_prints_each_child_once_and_refers_back_to_it(run3):
    last = max(m for m, kind in enumerate(run3.kinds) if kind == "child")
    shown: set[int] = set()
    first = run3.lineage_lines(last, shown=shown)
    for child in (run3.ancestors(last) | {last}) - set(run3.expert_ids):
        full = [line for line in first if run3.describe(child) in line and "shown above" not in line]
        assert len(full) == 1
    again = run3.lineage_lines(last, shown=shown)
    assert len(again) == 1 and again[0].startswith(run3.describe(last))
    assert again[0].endswith("(parents shown above)")


def test_lineage_cut_at_a_depth_counts_the_ancestors_left_out(run3):
    deepest = max((m for m, kind in enumerate(run3.kinds) if kind == "child"),
                  key=lambda m: len(run3.ancestors(m)))
    full = run3.lineage_lines(deepest)
    top = run3.lineage_lines(deepest, max_depth=0)
    assert top == [f"{full[0]}  (+{len(run3.ancestors(deepest))} more ancestors)"]
    one = run3.lineage_lines(deepest, max_depth=1)
    assert len(one) == 1 + len(set(run3.parents(deepest)))
    assert len(run3.lineage_lines(deepest, max_depth=GENERATIONS)) == len(full)


def test_summary_of_a_finished_run(run3):
    text = summary(run3)
    archives = run3.stored_archives()
    assert f"generation {GENERATIONS} of {GENERATIONS}" in text and "finished" in text
    for name, archive in zip(run3.task_names, archives):
        filled = int(np.count_nonzero(archive.occupant >= 0))
        row = next(line for line in text.splitlines() if line.startswith(f"{name} "))
        assert f"({filled}/{archive.occupant.size})" in row
        assert f"{archive.qd_score():.3f}" in row
        assert run3.describe(archive.elite()) in row
    aggregate = run3.kinds.index("aggregate")
    table = next(line for line in text.splitlines() if line.startswith("CycleQD aggregate"))
    assert table.split()[2:5] == [f"{s:.3f}" for s in run3.test_scores[aggregate]]
    assert "Lineage of the elites" in text and text.count("elite of ") == 3


def test_summary_at_an_earlier_generation_shows_that_generation(run3):
    text = summary(run3, 2)
    archives = run3.archives_at([2])[2]
    assert "generation 2 of" in text and "2 children evaluated" in text
    for archive in archives:
        assert f"{archive.qd_score():.3f}  {run3.describe(archive.elite())}" in text
    assert "CycleQD aggregate" not in text


def test_generation_out_of_range_is_refused(run3):
    with pytest.raises(StateError, match=rf"--generation: expected a generation in 0..{GENERATIONS} .* got 99"):
        run3.archives_at([99])
    with pytest.raises(StateError, match="got -1"):
        summary(run3, -1)


def test_run_in_progress_is_read_up_to_its_last_checkpoint(in_progress):
    run = RunState.load(in_progress)
    assert run.in_progress and run.phase == "search" and run.generations_done == 3
    assert len(run.history) == 3
    assert_same_archives(run.archives_at([3])[3], run.stored_archives())
    text = summary(run)
    assert "in progress, analysed up to its last checkpoint" in text
    assert "generation 3 of 8" in text and "not evaluated yet" in text


def test_run_still_in_its_initial_evaluations(tmp_path, tiny_family):
    run = RunState.load(interrupted_run(tmp_path, tiny_family, after_generation=0, phase="init"))
    assert run.phase == "init" and not run.has_archives
    text = summary(run)
    assert "no archives yet (phase init)" in text
    assert "base (#0)" in text and "expert alpha (#1)" in text and "expert beta" not in text
    with pytest.raises(StateError, match="phase init: it has no archives yet"):
        run.stored_archives()


def copy_state(run_dir, target):
    target.mkdir()
    for name in ("state.h5", "state.h5.bak"):
        shutil.copyfile(run_dir / name, target / name)
    return target


def test_another_schema_version_gives_a_clear_error(run3, tmp_path):
    target = copy_state(run3.path, tmp_path / "run")
    for name in ("state.h5", "state.h5.bak"):
        with h5py.File(target / name, "r+") as f:
            f.attrs["schema_version"] = 2
    with pytest.raises(StateError, match=r"state.h5 has state schema version 2; this cqd_mpi .* reads version 1$"):
        RunState.load(target)


def test_a_corrupt_state_falls_back_to_the_previous_checkpoint(run3, tmp_path):
    target = copy_state(run3.path, tmp_path / "run")
    data = (target / "state.h5").read_bytes()
    (target / "state.h5").write_bytes(data[: len(data) // 3])
    run = RunState.load(target)
    assert run.source == target / "state.h5.bak"
    assert "previous checkpoint" in summary(run)
    (target / "state.h5.bak").write_bytes(b"not hdf5")
    with pytest.raises(StateError, match=r"state\.h5 is truncated or corrupt"):
        RunState.load(target)


def test_missing_run_dir_and_missing_state(tmp_path):
    with pytest.raises(StateError, match=f"run dir {tmp_path / 'nope'} does not exist"):
        RunState.load(tmp_path / "nope")
    with pytest.raises(StateError, match=r"has no state\.h5: it is not a cqd_mpi run dir"):
        RunState.load(tmp_path)


def test_reading_does_not_wait_for_a_writer_and_holds_no_lock(run3, tmp_path):
    target = copy_state(run3.path, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time\n"
         f"f = h5py.File({str(target / 'state.h5')!r}, 'r+')\nprint('open', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        run = RunState.load(target)
        assert run.source == target / "state.h5" and run.generations_done == GENERATIONS
    finally:
        holder.kill()
        holder.wait()
    RunState.load(target)
    with h5py.File(target / "state.h5", "r+") as f:
        assert f.attrs["phase"] == "done"


def test_projection_takes_the_best_over_the_other_axes():
    values = np.full((2, 3, 2), np.nan)
    values[0, 1, 0] = 0.5
    values[0, 1, 1] = 0.7
    values[1, 2, 1] = 0.2
    np.testing.assert_array_equal(project(values, (0, 1)), [[np.nan, 0.7, np.nan], [np.nan, np.nan, 0.2]])
    np.testing.assert_array_equal(project(values, (2,)), [0.5, 0.7])
    np.testing.assert_array_equal(project(values, (0, 1, 2)), values)
    assert axis_pairs(3) == [(0, 1), (0, 2), (1, 2)] and axis_pairs(2) == [(0, 1)]
