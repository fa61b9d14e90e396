"""Intervals over seeds and paired comparisons (analysis/uncertainty.py), checked against
scipy.stats' own t-test and interval and against a hand-computed value."""

import sys

import numpy as np
import pytest

from cqd_mpi.analysis.uncertainty import ONE_SEED, interval, paired
from cqd_mpi.errors import MissingDependency

stats = pytest.importorskip("scipy.stats", reason="needs scipy: pip install 'cqd_mpi[stats]'")


def test_interval_by_hand_and_as_scipy_computes_it():
    # mean 0.5, sd 0.1, n = 3: half-width t * 0.1 / sqrt(3) with t the 0.975 quantile of Student t with
    # 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)): t = sqrt(2 * 0.95^2 / (1 - 0.95^2)) = 4.3027
    t = np.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    entry = interval([0.4, 0.5, 0.6])
    assert entry.mean == pytest.approx(0.5) and entry.n == 3 and t == pytest.approx(4.3027, abs=1e-4)
    assert entry.high - entry.mean == pytest.approx(t * 0.1 / np.sqrt(3), rel=1e-12)
    values = np.array([0.61, 0.58, 0.70, 0.66, 0.59])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert (interval(values).low, interval(values).high) == pytest.approx((low, high), rel=1e-12)
    assert interval([0.4, 0.5, 0.6]).excludes_zero and not interval([-0.1, 0.1, 0.05]).excludes_zero


def test_one_seed_has_no_interval_and_says_why():
    entry = interval([0.7])
    assert (entry.mean, entry.low, entry.high, entry.reason) == (0.7, None, None, ONE_SEED)
    result = paired([3], np.array([0.7]), np.array([0.6]))
    assert result.p_value is None and result.verdict == ONE_SEED and (result.higher, result.lower) == (1, 0)


def test_paired_difference_matches_ttest_rel_and_the_sign_test():
    method = np.array([0.62, 0.55, 0.71, 0.64, 0.60])
    reference = np.array([0.58, 0.56, 0.63, 0.57, 0.52])
    result = paired([0, 1, 2, 3, 4], method, reference)
    expected = stats.ttest_rel(method, reference)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-10)
    ci = expected.confidence_interval(0.95)
    assert (result.difference.low, result.difference.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert result.difference.mean == pytest.approx((method - reference).mean())
    assert (result.higher, result.lower, result.ties) == (4, 1, 0)
    assert result.sign_p == pytest.approx(stats.binomtest(4, 5).pvalue) == pytest.approx(6 / 16)
    assert result.verdict == "higher" and result.difference.low > 0 and result.seeds == (0, 1, 2, 3, 4)
    flipped = paired([0, 1, 2, 3, 4], reference, method)
    assert flipped.verdict == "lower" and flipped.p_value == pytest.approx(result.p_value)
    # by hand: differences 0.1, 0.2, 0.3 give t = 0.2 / (0.1 / sqrt(3)) = 2 sqrt(3) on 2 degrees of freedom,
    # whose two-sided tail is 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14)
    by_hand = paired([0, 1, 2], np.array([0.6, 0.7, 0.8]), np.array([0.5, 0.5, 0.5]))
    assert by_hand.p_value == pytest.approx(1 - np.sqrt(12 / 14), rel=1e-9) == pytest.approx(0.0742, abs=1e-4)
    close = paired([0, 1, 2], np.array([0.5, 0.6, 0.4]), np.array([0.52, 0.55, 0.41]))
    assert close.verdict == "unresolved" and close.difference.low < 0 < close.difference.high


def test_equal_differences_have_no_t_test_and_ties_count():
    same = paired([0, 1, 2], np.array([0.5, 0.6, 0.7]), np.array([0.5, 0.6, 0.7]))
    assert same.p_value is None and same.sign_p is None and same.ties == 3 and same.verdict == "unresolved"
    assert same.difference.low == same.difference.high == 0.0
    shifted = paired([0, 1, 2], np.array([0.3, 0.4, 0.5]) + 0.1, np.array([0.3, 0.4, 0.5]))
    assert shifted.p_value is None and shifted.higher == 3


def test_without_scipy_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(MissingDependency, match=r"pip install 'cqd_mpi\[stats\]'"):
        interval([0.1, 0.2])
