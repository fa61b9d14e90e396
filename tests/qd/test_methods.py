"""The search methods of the paper's comparisons (qd/methods.py): non-cyclic QD, CMA-ES and
NSGA-II as ask/tell cores with CycleQD's interface, their budgets, final models and exact
continuation after a save and a reload at any point."""

import numpy as np
import pytest

from cqd_mpi.errors import ConfigError
from cqd_mpi.qd.coefficients import CMAES, NSGA2
from cqd_mpi.qd.cycleqd import CycleQD
from cqd_mpi.qd.methods import method_class
from cqd_mpi.qd.noncyclic import NonCyclicQD
from cqd_mpi.run.keeping import kept
from cqd_mpi.run.state import from_tree, to_tree
from tests.qd.helpers import assert_trees_equal, make, make_core, run, run_all, smooth_scores

BASELINES = pytest.mark.extra("baselines")
"""cma-es and nsga2 need the baselines extra (cma, pymoo)."""


def test_methods_by_name_and_a_clear_error_for_an_unknown_one():
    assert method_class("cycleqd") is CycleQD and method_class("qd") is NonCyclicQD
    assert method_class("cma-es") is CMAES and method_class("nsga2") is NSGA2
    assert method_class("cqd_mpi.qd.noncyclic:NonCyclicQD") is NonCyclicQD
    with pytest.raises(ConfigError, match=r"qd\.method: unknown search method kind 'ga'; expected one of cycleqd, qd"):
        method_class("ga")


def test_non_cyclic_qd_offers_a_child_to_the_run_that_bred_it_only():
    core = make(NonCyclicQD, generations=9)
    run(core)
    children = [r for r in core.models if r.kind == "child"]
    assert len(children) == 9
    for q, archive in enumerate(core.archives):
        for m in archive.members():
            record = core.models[int(m)]
            assert record.kind == "expert" or record.active_task == q
    for row in core.history:
        assert not any(row.entered[q] for q in range(3) if q != row.active_task)
    assert [r.kind for r in core.models].count("aggregate") == 1


@pytest.mark.parametrize("cls", [CMAES, NSGA2])
@pytest.mark.extra("baselines")
def test_a_coefficient_search_spends_exactly_the_budget_in_whole_populations_but_the_last(cls):
    core = make(cls, generations=10)
    run_all(core)
    candidates = core.strategy.candidates(core)
    assert len(candidates) == 10 and [r.generation for r in candidates] == list(range(1, 11))
    assert [r.kind for r in core.models].count("child") == 0
    assert len(core.history) == 10 and core.generations_done == 10
    for r in candidates:
        assert np.all((r.coefficients >= 0.0) & (r.coefficients <= 1.0))
        recipe = core.recipe(r.id)
        assert recipe.kind == "aggregate" and recipe.members == (1, 2, 3)
        assert recipe.betas == tuple(r.coefficients)
        assert not kept(core)[r.id]
    final = [r for r in core.models if r.kind == "aggregate"][-1]
    best = max(candidates, key=lambda r: (np.mean(r.scores), -r.id))
    np.testing.assert_array_equal(final.coefficients, best.coefficients)
    assert core.recipe(final.id).betas == tuple(best.coefficients) and kept(core)[final.id]
    assert np.all(np.isfinite(final.test_scores))
    average = next(r for r in core.models if r.kind == "average")
    assert core.recipe(average.id).betas == (1 / 3,) * 3 and np.all(np.isfinite(average.test_scores))


@pytest.mark.extra("baselines")
def test_a_population_is_issued_at_once_for_parallel_evaluation():
    core = make(CMAES, generations=8, population=4)
    for _ in range(4):
        job = core.ask()
        core.tell(job.model_id, [0.5, 0.4, 0.3])
    jobs = [core.ask() for _ in range(5)]
    assert [j is None for j in jobs] == [False] * 4 + [True]
    assert {j.generation for j in jobs[:4]} == {1, 2, 3, 4}


@pytest.mark.extra("baselines")
def test_cma_es_improves_on_its_start_where_the_scores_have_a_slope():
    core = make(CMAES, generations=40, population=6)
    run_all(core)
    means = [np.mean(r.scores) for r in core.strategy.candidates(core)]
    assert np.mean(means[-6:]) > np.mean(means[:6])


@pytest.mark.extra("baselines")
def test_nsga2_final_model_is_on_the_front_of_everything_evaluated():
    core = make(NSGA2, generations=16)
    run_all(core)
    scores = np.stack([r.scores for r in core.strategy.candidates(core)])
    final = [r for r in core.models if r.kind == "aggregate"][-1]
    chosen = next(r for r in core.strategy.candidates(core) if np.array_equal(r.coefficients, final.coefficients)).scores
    dominated = np.any(np.all(scores >= chosen, axis=1) & np.any(scores > chosen, axis=1))
    assert not dominated


@pytest.mark.parametrize("cls", [NonCyclicQD, pytest.param(CMAES, marks=BASELINES), pytest.param(NSGA2, marks=BASELINES)])
@pytest.mark.parametrize("stop_after", [3, 6, 9, 13])
def test_a_reloaded_core_continues_exactly_like_the_original(cls, stop_after):
    original = make(cls, generations=11)
    score = smooth_scores(original)
    for _ in range(stop_after):
        job = original.ask()
        original.tell(job.model_id, score(job.model_id))
    if stop_after % 2:
        original.ask()
    restored = from_tree(to_tree(original))
    assert type(restored.strategy) is cls
    restored.redispatch()
    original.redispatch()
    run_all(original)
    run_all(restored)
    assert_trees_equal(to_tree(original), to_tree(restored))


@pytest.mark.extra("baselines")
def test_a_tampered_state_is_refused_when_the_optimizer_replays_it():
    from cqd_mpi.errors import StateError

    core = make(CMAES, generations=12)
    score = smooth_scores(core)
    for _ in range(4 + 6):
        job = core.ask()
        core.tell(job.model_id, score(job.model_id))
    tree = to_tree(core)
    first = next(i for i, k in enumerate(tree["models"]["kind"]) if k == "combination")
    tree["models"]["coefficients"][first, 0] += 1e-9
    restored = from_tree(tree)
    with pytest.raises(StateError, match="replaying CMA-ES population 0"):
        run_all(restored)


class PluginQD(NonCyclicQD):
    """A plug-in method that inherits a built-in's `method` attribute."""


def test_a_plug_in_method_is_stored_by_its_module_and_class():
    core = make_core(PluginQD, generations=2)
    tree = to_tree(core)
    assert tree["attrs"]["method"] == "tests.qd.test_methods:PluginQD"
    assert type(from_tree(tree).strategy) is PluginQD
    assert to_tree(make(CMAES))["attrs"]["method"] == "cma-es"
