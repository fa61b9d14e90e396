"""The search methods of the paper's comparisons (qd/methods.py): non-cyclic QD, CMA-ES,
NSGA-II and policy gradient as ask/tell cores with CycleQD's interface, their budgets, final models and exact
continuation after a save and a reload at any point."""

import numpy as np
import pytest

from cqd_mpi.errors import ConfigError
from cqd_mpi.qd.coefficients import CMAES, NSGA2
from cqd_mpi.qd.cycleqd import CycleQD
from cqd_mpi.qd.methods import method_class
from cqd_mpi.qd.noncyclic import NonCyclicQD
from cqd_mpi.qd.policy_gradient import PolicyGradient
from cqd_mpi.run.keeping import kept
from cqd_mpi.run.state import from_tree, to_tree
from tests.qd.helpers import assert_trees_equal, make, make_core, run, run_all, smooth_scores

BASELINES = pytest.mark.extra("baselines")
"""cma-es and nsga2 need the baselines extra (cma, pymoo)."""


def test_methods_by_name_and_a_clear_error_for_an_unknown_one():
    assert method_class("cycleqd") is CycleQD and method_class("qd") is NonCyclicQD
    assert method_class("cma-es") is CMAES and method_class("nsga2") is NSGA2
    assert method_class("policy-gradient") is PolicyGradient
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


@pytest.mark.parametrize("cls", [pytest.param(CMAES, marks=BASELINES), pytest.param(NSGA2, marks=BASELINES),
                                 PolicyGradient])
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


def test_policy_gradient_moves_its_policy_toward_the_better_region():
    target = np.array([0.9, 0.1, 0.5])
    core = make(PolicyGradient, generations=96, population=8, sigma0=0.1)

    def score(model_id):
        record = core.models[model_id]
        if np.all(np.isfinite(record.coefficients)):
            return np.full(3, 1.0 - np.sum((record.coefficients - target) ** 2))
        return np.random.default_rng(model_id).random(3)

    run(core, score)
    mean, std = core.strategy.policy()
    start = np.full(3, 1 / 3)
    assert np.linalg.norm(mean - target) < 0.5 * np.linalg.norm(start - target), mean
    rewards = [np.mean(r.scores) for r in core.strategy.candidates(core)]
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.1
    assert std.shape == (3,) and np.all(std > 0)


def test_policy_gradient_settings_are_checked_and_stored_whole():
    with pytest.raises(ValueError, match="baseline_decay must be in"):
        PolicyGradient.Settings(baseline_decay=1.0)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        PolicyGradient.Settings(learning_rate=0)
    core = make(PolicyGradient, learning_rate=0.01, baseline_decay=0.5)
    tree = to_tree(core)
    assert tree["attrs"]["method"] == "policy-gradient" and tree["attrs"]["learning_rate"] == 0.01
    assert from_tree(tree).strategy.settings == core.strategy.settings


@pytest.mark.extra("baselines")
def test_nsga2_final_model_is_on_the_front_of_everything_evaluated():
    core = make(NSGA2, generations=16)
    run_all(core)
    scores = np.stack([r.scores for r in core.strategy.candidates(core)])
    final = [r for r in core.models if r.kind == "aggregate"][-1]
    chosen = next(r for r in core.strategy.candidates(core) if np.array_equal(r.coefficients, final.coefficients)).scores
    dominated = np.any(np.all(scores >= chosen, axis=1) & np.any(scores > chosen, axis=1))
    assert not dominated


@pytest.mark.parametrize("cls", [NonCyclicQD, pytest.param(CMAES, marks=BASELINES), pytest.param(NSGA2, marks=BASELINES),
                                 PolicyGradient])
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


@pytest.mark.parametrize("cls", [CycleQD, PolicyGradient])
def test_budget_curve_points_change_no_candidate_and_resume_exactly(cls):
    """`test_every`: the would-be final model queued every N models before the budget, scored on
    the test split; the search's candidates are those of a run without it (ids aside), and a
    state reloaded between points continues exactly."""
    def key(core, m):
        record = core.models[m]
        return m if record.kind in ("base", "expert") else (str(record.kind), record.generation)

    def candidates(core):
        return [(r.generation, key(core, r.parent1) if r.parent1 >= 0 else -1,
                 key(core, r.parent2) if r.parent2 >= 0 else -1, r.w1, r.mutation_seed, tuple(r.coefficients))
                for r in core.models if r.kind in ("child", "combination")]

    def scorer(core):  # keyed by what a model is, not by its id (the points shift the ids)
        smooth = smooth_scores(core)

        def score(m):
            record = core.models[m]
            if record.kind == "child":
                return np.random.default_rng([record.generation, 7]).random(3)
            return smooth(m)
        return score

    def finish(core):
        score = scorer(core)
        while not core.done:
            job = core.ask()
            core.tell(job.model_id, score(job.model_id))

    plain = make(cls, generations=9, pipeline_depth=1)
    curved = make(cls, generations=9, pipeline_depth=1, test_every=2)
    finish(plain)
    score = scorer(curved)
    for _ in range(9):
        job = curved.ask()
        curved.tell(job.model_id, score(job.model_id))
    restored = from_tree(to_tree(curved))
    for core in (curved, restored):
        core.redispatch()
        finish(core)
    assert_trees_equal(to_tree(curved), to_tree(restored))
    np.testing.assert_equal(candidates(curved), candidates(plain))
    points = [r for r in curved.models if r.kind == "curve"]
    assert [r.generation for r in points] == [2, 4, 6, 8]
    assert all(np.all(np.isfinite(r.test_scores)) and np.all(np.isnan(r.scores)) for r in points)
    tree = to_tree(curved)
    np.testing.assert_array_equal(tree["curve"]["models_evaluated"], [2, 4, 6, 8])
    np.testing.assert_array_equal(tree["curve"]["test_scores"], np.stack([r.test_scores for r in points]))
    assert "curve" not in to_tree(plain)
