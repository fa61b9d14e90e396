"""The draws of CycleQD: elite sampling of parents, crossover weights, the aggregate's betas."""

import math

import numpy as np
import pytest

from cqd_mpi.errors import ConfigError
from cqd_mpi.qd.sampling import elite_weights, sample_crossover_weights, sample_parents, softmax
from tests.qd.helpers import make_core, run


def test_elite_weights_match_formula():
    scores = np.array([[0.2, 1.0], [0.6, 0.5], [1.0, 0.0]])
    norm = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    gamma = np.prod(0.5 + norm * 0.3, axis=1)
    np.testing.assert_allclose(elite_weights(scores, alpha_low=0.5, alpha_high=0.8), gamma / gamma.sum())


def test_elite_weights_constant_task_contributes_constant():
    scores = np.array([[0.3, 0.2], [0.3, 0.8]])
    p = elite_weights(scores, alpha_low=0.5, alpha_high=0.8)
    np.testing.assert_allclose(p, [0.5 / 1.3, 0.8 / 1.3])


def test_sample_parents_distinct_and_weighted():
    rng = np.random.default_rng(0)
    members = np.array([10, 11, 12])
    scores = np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    draws = [sample_parents(rng, members, scores, method="elite", alpha_low=0.5, alpha_high=0.8)
             for _ in range(3000)]
    assert all(a != b for a, b in draws)
    counts = {m: sum(m in d for d in draws) for m in members}
    assert counts[12] > counts[11] > counts[10]


def test_sample_parents_single_member_is_both_parents():
    rng = np.random.default_rng(0)
    assert sample_parents(rng, np.array([5]), np.array([[0.1]]), method="random",
                          alpha_low=0.5, alpha_high=0.8) == (5, 5)


def test_sample_parents_random_is_uniform():
    rng = np.random.default_rng(1)
    members = np.array([1, 2, 3, 4])
    scores = np.array([[0.0], [0.1], [0.9], [1.0]])
    draws = [sample_parents(rng, members, scores, method="random", alpha_low=0.5, alpha_high=0.8)
             for _ in range(4000)]
    counts = np.array([sum(m in d for d in draws) for m in members])
    assert np.all(np.abs(counts / 4000 - 0.5) < 0.05)


def test_sample_crossover_weights_is_seeded_and_resamples_near_zero_sums():
    assert sample_crossover_weights(np.random.default_rng(5)) == sample_crossover_weights(
        np.random.default_rng(5)
    )
    w1, w2 = sample_crossover_weights(np.random.default_rng(5), 1.0, 0.03)
    assert 0.8 < w1 < 1.2 and 0.8 < w2 < 1.2
    rng, raw = np.random.default_rng(11), np.random.default_rng(11)
    rejected = 0
    for _ in range(100):
        w1, w2 = sample_crossover_weights(rng, 0.0, 1e-6)
        assert abs(w1 + w2) >= 1e-6
        while True:
            a, b = raw.normal(0.0, 1e-6, size=2)
            if abs(a + b) >= 1e-6:
                break
            rejected += 1
        assert (a, b) == (w1, w2)
    assert rejected > 10


def test_softmax():
    assert softmax([0.0, 0.0]) == [0.5, 0.5]
    betas = softmax([0.2, 0.5, 0.9], temperature=0.5)
    expected = np.exp(np.array([0.2, 0.5, 0.9]) / 0.5)
    np.testing.assert_allclose(betas, expected / expected.sum(), rtol=1e-12)
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]
    with pytest.raises(ConfigError, match=r"temperature: expected a number > 0"):
        softmax([1.0], temperature=0.0)
    with pytest.raises(ConfigError, match=r"scores must be finite"):
        softmax([1.0, math.nan])


@pytest.mark.parametrize(("scores", "positive"), [
    ([[0.0, 1.0], [1.0, 0.0]], 0),
    ([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], 1),
])
def test_elite_weights_fall_back_to_uniform_when_fewer_than_two_are_positive(scores, positive):
    """alpha_low = 0 gives each task's worst model weight 0."""
    gamma = np.prod(0.0 + np.array(scores) * 0.8, axis=1)
    assert np.count_nonzero(gamma) == positive
    p = elite_weights(np.array(scores), alpha_low=0.0, alpha_high=0.8)
    np.testing.assert_array_equal(p, np.full(len(scores), 1 / len(scores)))
    rng = np.random.default_rng(0)
    a, b = sample_parents(rng, np.arange(len(scores)), np.array(scores), method="elite",
                          alpha_low=0.0, alpha_high=0.8)
    assert a != b


def test_alpha_low_zero_runs_to_the_end():
    core = make_core(alpha_low=0.0)
    run(core)
    assert core.done and core.generations_done == core.generations
