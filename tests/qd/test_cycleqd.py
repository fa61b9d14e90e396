import math

import numpy as np
import pytest

from cqd_mpi.qd.archive import Bins
from cqd_mpi.qd.records import make_splits
from cqd_mpi.qd.sampling import softmax
from cqd_mpi.run.keeping import kept, written
from cqd_mpi.run.report import build_report
from tests.qd.helpers import NAMES, fake_scores, make_core, run


def test_make_splits_seeded_disjoint_complete():
    a = make_splits({"t": [str(i) for i in range(11)]}, seed=1)["t"]
    b = make_splits({"t": [str(i) for i in range(11)]}, seed=1)["t"]
    c = make_splits({"t": [str(i) for i in range(11)]}, seed=2)["t"]
    assert a == b and a != c
    assert set(a.search).isdisjoint(a.test)
    assert sorted(a.search + a.test, key=int) == [str(i) for i in range(11)]
    assert len(a.search) == 6


def test_init_phase_scores_base_and_experts_then_sets_bins():
    core = make_core()
    jobs = [core.ask() for _ in range(4)]
    assert core.ask() is None
    assert [j.model_id for j in jobs] == [0, 1, 2, 3]
    assert [j.recipe.kind for j in jobs] == ["stored"] * 4
    assert [core.models[j.model_id].source for j in jobs] == ["/models/base", "/models/code", "/models/os", "/models/db"]
    assert all(j.phase == "init" and j.split == "search" for j in jobs)
    expert_scores = {1: [0.5, 0.1, 0.2], 2: [0.2, 0.6, 0.1], 3: [0.1, 0.2, 0.4]}
    core.tell(0, [0.1, 0.1, 0.1])
    for m, s in expert_scores.items():
        core.tell(m, s)
    assert core.phase == "search"
    assert core.bins[0] == Bins(0.85 * 0.1, 1.15 * 0.5, 5)
    assert core.bins[1] == Bins(0.85 * 0.1, 1.15 * 0.6, 5)
    for archive in core.archives:
        assert sorted(archive.members()) == [1, 2, 3]


def test_explicit_bins_are_kept():
    bins = [Bins(0.0, 1.0, 3), None, Bins(0.2, 0.4, 2)]
    core = make_core(bins=bins)
    run(core, stop_after=4)
    assert core.bins[0] == bins[0] and core.bins[2] == bins[2]
    assert core.archives[0].shape == (core.bins[1].n_bins, 2)


def test_active_archive_cycles_and_children_come_from_it():
    core = make_core()
    run(core, stop_after=4)
    for t in range(1, 13):
        job = core.ask()
        assert job.generation == t and job.recipe.active_task == t % 3
        members = set(core.archives[t % 3].members().tolist())
        assert set(job.recipe.parents) <= members
        w1, w2 = job.recipe.weights
        assert abs(w1 - 1.0) < 0.2 and abs(w2 - 1.0) < 0.2
        core.tell(job.model_id, fake_scores(job.model_id))
    assert core.phase == "final"


def test_children_are_offered_to_all_archives_with_strict_improvement():
    core = make_core(generations=1)
    for m, s in enumerate([[0.1] * 3, [0.5, 0.1, 0.2], [0.2, 0.6, 0.1], [0.1, 0.2, 0.4]]):
        core.ask()
        core.tell(m, s)
    child = core.ask()
    told = core.tell(child.model_id, [0.9, 0.9, 0.9])
    assert told.entered == NAMES and kept(core)[child.model_id]
    record = core.models[child.model_id]
    assert kept(core)[record.id] and record.id in written(core)
    row = core.history[-1]
    assert row.entered.tolist() == [True, True, True]
    assert row.child_id == child.model_id and row.generation == 1


def test_same_seed_same_run_other_seed_differs():
    a, b, c = make_core(), make_core(), make_core(seed=6)
    run(a), run(b), run(c)
    parents = [[(r.parent1, r.parent2, r.w1, r.w2, r.mutation_seed) for r in x.models] for x in (a, b, c)]
    assert parents[0] == parents[1]
    assert parents[0] != parents[2]


def test_tell_must_follow_ask_order():
    core = make_core()
    core.ask(), core.ask()
    with pytest.raises(ValueError, match="expected model 0"):
        core.tell(1, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        core.tell(0, [0.1, math.nan, 0.3])


def test_pipeline_keeps_depth_plus_one_children_in_flight_whatever_the_ask_timing():
    eager, lazy = make_core(pipeline_depth=2), make_core(pipeline_depth=2)
    run(eager, stop_after=4)
    run(lazy, stop_after=4)
    asked = []
    while (job := eager.ask()) is not None:
        asked.append(job)
    assert [j.generation for j in asked] == [1, 2, 3]
    for job in asked:
        eager.tell(job.model_id, fake_scores(job.model_id))
    run(eager)
    run(lazy)
    key = [(r.parent1, r.parent2, r.w1) for r in eager.models]
    assert key == [(r.parent1, r.parent2, r.w1) for r in lazy.models]
    sequential = make_core()
    run(sequential)
    assert key != [(r.parent1, r.parent2, r.w1) for r in sequential.models]


def test_final_phase_scores_everything_on_the_test_split():
    core = make_core(generations=6)
    run(core)
    assert core.done
    kinds = [r.kind for r in core.models]
    assert kinds.count("average") == 1 and kinds.count("aggregate") == 1
    average = next(r for r in core.models if r.kind == "average")
    aggregate = next(r for r in core.models if r.kind == "aggregate")
    elites = core.elites()
    for m in [0, 1, 2, 3, *elites, average.id, aggregate.id]:
        assert np.all(np.isfinite(core.models[m].test_scores)), m
    betas = softmax([core.models[e].scores[k] for k, e in enumerate(elites)])
    np.testing.assert_allclose(core.aggregate_betas(), betas)
    report = build_report(core)
    assert report["aggregate"]["id"] == aggregate.id
    assert report["naive_average"]["mean"] == pytest.approx(float(np.mean(average.test_scores)))
    assert set(report["elites"]) == set(NAMES)


def test_dead_models_are_children_that_left_every_archive():
    core = make_core(generations=3, bins=[Bins(0, 1, 1)] * 3)
    for m in range(4):
        core.ask()
        core.tell(m, [0.5, 0.5, 0.5])
    first = core.ask()
    assert core.tell(first.model_id, [0.6, 0.6, 0.6]).entered == NAMES
    second = core.ask()
    told = core.tell(second.model_id, [0.7, 0.7, 0.7])
    assert told.entered == NAMES and told.dead == (first.model_id,)
    assert not kept(core)[first.model_id]
    third = core.ask()
    assert core.tell(third.model_id, [0.1, 0.1, 0.1]).dead == ()
    assert core.live_models() >= {second.model_id}
