"""The draws and weights of CycleQD: which parents, which crossover weights, and how much each
elite counts in the aggregate.

Each is a pure function of its inputs and a numpy Generator, so the core's randomness stays
keyed by (seed, generation, purpose) and the `merge` command draws exactly what a run draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cqd_mpi.errors import ConfigError


def elite_weights(scores: np.ndarray, *, alpha_low: float, alpha_high: float) -> np.ndarray:
    """Sampling probabilities of the paper's elite sampling.

    `scores` is (N models, K tasks). gamma_j = prod_k (a_low + norm(f_jk) (a_high - a_low)),
    with min/max normalisation over the N models; a task whose max == min contributes a
    constant factor. Returns gamma / sum(gamma), or uniform weights when fewer than two
    models (the one, in an archive of one) have gamma > 0: alpha_low = 0 gives every task's
    worst model 0, and two distinct parents cannot be drawn from one weight (the authors'
    code falls back to uniform when all are 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    lo = scores.min(axis=0)
    span = scores.max(axis=0) - lo
    normalised = np.divide(scores - lo, span, out=np.zeros_like(scores), where=span > 0)
    gamma = np.prod(alpha_low + normalised * (alpha_high - alpha_low), axis=1)
    if np.count_nonzero(gamma > 0) < min(2, gamma.size):
        return np.full(gamma.size, 1.0 / gamma.size)
    return gamma / gamma.sum()


def sample_parents(rng: np.random.Generator, members: np.ndarray, scores: np.ndarray, *,
                   method: str, alpha_low: float, alpha_high: float) -> tuple[int, int]:
    """Two distinct parents drawn without replacement; a single member is both parents."""
    members = np.asarray(members)
    if members.size == 0:
        raise ValueError("cannot sample parents from an empty archive")
    if members.size == 1:
        return int(members[0]), int(members[0])
    if method == "elite":
        p = elite_weights(scores, alpha_low=alpha_low, alpha_high=alpha_high)
    elif method == "random":
        p = None
    else:
        raise ValueError(f"sampling method must be 'elite' or 'random', got {method!r}")
    first, second = rng.choice(members.size, size=2, replace=False, p=p)
    return int(members[first]), int(members[second])


def sample_crossover_weights(
    rng: np.random.Generator, mu: float = 1.0, sigma: float = 0.03
) -> tuple[float, float]:
    """w1, w2 ~ N(mu, sigma^2) i.i.d., drawn again while |w1 + w2| < 1e-6."""
    while True:
        w1, w2 = (float(w) for w in rng.normal(mu, sigma, size=2))
        if abs(w1 + w2) >= 1e-6:
            return w1, w2


def softmax(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """exp(f_k / T) / sum exp(f_i / T), computed stably in float64."""
    if not scores:
        raise ValueError("softmax needs at least one score")
    if not temperature > 0:
        raise ConfigError(f"temperature: expected a number > 0, got {temperature!r}")
    values = np.asarray(scores, dtype=np.float64) / temperature
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"scores must be finite numbers, got {list(scores)}")
    weights = np.exp(values - values.max())
    return [float(x) for x in weights / weights.sum()]
