"""Uncertainty over seeds for `compare`: a Student-t 95% confidence interval of a mean over
per-seed scores, and the paired comparison of two methods over the seeds they share.

Seeds are the unit of replication: a seed fixes the search/test split and all of a run's
randomness, and runs with the same seed share their test split, so two methods are compared
seed by seed (a paired design) and the per-seed differences carry the uncertainty. The t
quantiles and tails come from scipy.stats (the `stats` extra).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from cqd_mpi.errors import require

LEVEL = 0.95
ONE_SEED = "one seed: no interval (the spread over seeds is unknown)"


def _stats():
    return require("scipy.stats", extra="stats", feature="compare's confidence intervals and paired tests")


@dataclasses.dataclass(frozen=True)
class Interval:
    """The mean of n values and its 95% Student-t interval, mean ± t(0.975, n-1) · sd/√n;
    low and high are None for one value (why: `reason`)."""

    mean: float
    n: int
    low: float | None
    high: float | None

    @property
    def reason(self) -> str | None:
        return ONE_SEED if self.low is None else None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def _spread(values: np.ndarray) -> float:
    """The sample sd, with float noise (values equal up to rounding) counted as none."""
    sd = float(values.std(ddof=1))
    return 0.0 if sd <= 1e-12 * max(1.0, float(np.abs(values).max())) else sd


def interval(values: Sequence[float]) -> Interval:
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    n = len(values)
    if n < 2:
        return Interval(mean, n, None, None)
    half = float(_stats().t.ppf(0.5 + LEVEL / 2, n - 1)) * _spread(values) / math.sqrt(n)
    return Interval(mean, n, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A method against the reference over their common seeds: the mean per-seed difference
    (method - reference) with its interval, the paired t-test's two-sided p-value (None with
    fewer than two seeds, or when every difference is the same: the test is undefined), and
    the sign test: seeds where the method is higher, lower, equal, and the exact two-sided
    binomial p-value over the seeds that differ."""

    seeds: tuple[int, ...]
    difference: Interval
    p_value: float | None
    higher: int
    lower: int
    ties: int
    sign_p: float | None

    @property
    def verdict(self) -> str:
        """'higher' or 'lower' when the interval of the mean difference excludes zero (resolved),
        else 'unresolved' (or why there is no interval)."""
        if self.difference.low is None:
            return self.difference.reason
        if not self.difference.excludes_zero:
            return "unresolved"
        return "higher" if self.difference.mean > 0 else "lower"


def paired(seeds: Sequence[int], method: np.ndarray, reference: np.ndarray) -> Paired:
    """`method` and `reference`: one score per seed in `seeds` (the seeds both have)."""
    d = np.asarray(method, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    d[np.abs(d) <= 1e-12] = 0.0
    diff = interval(d)
    p = None
    if len(d) >= 2 and _spread(d) > 0:
        t = diff.mean / (_spread(d) / math.sqrt(len(d)))
        p = float(2 * _stats().t.sf(abs(t), len(d) - 1))
    higher, lower = int((d > 0).sum()), int((d < 0).sum())
    sign_p = float(_stats().binomtest(higher, higher + lower).pvalue) if higher + lower else None
    return Paired(seeds=tuple(int(s) for s in seeds), difference=diff, p_value=p, higher=higher, lower=lower,
                  ties=len(d) - higher - lower, sign_p=sign_p)
