"""The budget curve's reader and points (analysis/budget_curve.py): the `curve` group's layout,
the final model as the point at the budget, and the seeds' interval at the counts all share."""

import numpy as np
import pytest

from cqd_mpi.analysis.budget_curve import Curve, group_points, read_curve, with_final
from cqd_mpi.errors import StateError

pytest.importorskip("scipy.stats", reason="needs scipy: pip install 'cqd_mpi[stats]'")


def tree(x, y):
    return {"curve": {"models_evaluated": np.asarray(x), "test_scores": np.asarray(y, dtype=np.float64)}}


def test_the_layout_is_read_and_checked():
    assert read_curve({"attrs": {}}, "s.h5", 2) is None
    curve = read_curve(tree(np.array([5, 10], dtype=np.int64), [[0.1, 0.2], [0.3, 0.4]]), "s.h5", 2)
    assert curve.models_evaluated.tolist() == [5, 10] and curve.test_scores.shape == (2, 2)
    with pytest.raises(StateError, match=r"^s\.h5: curve/test_scores must be finite \[2, 3\] \(points x tasks\), "
                                         r"got \[2, 2\]$"):
        read_curve(tree(np.array([5, 10]), [[0.1, 0.2], [0.3, 0.4]]), "s.h5", 3)
    with pytest.raises(StateError, match=r"curve/models_evaluated must be increasing non-negative integers"):
        read_curve(tree(np.array([10, 5]), [[0.1, 0.2], [0.3, 0.4]]), "s.h5", 2)
    with pytest.raises(StateError, match=r"curve/models_evaluated must be increasing non-negative integers"):
        read_curve(tree(np.array([5.0, 10.0]), [[0.1, 0.2], [0.3, 0.4]]), "s.h5", 2)
    with pytest.raises(StateError, match=r"the group curve needs datasets models_evaluated and test_scores, "
                                         r"got \['test_scores'\]"):
        read_curve({"curve": {"test_scores": np.zeros((1, 2))}}, "s.h5", 2)


def test_points_are_the_final_model_at_the_budget_and_the_seeds_common_counts():
    one = with_final(Curve(np.array([2, 4]), np.array([[0.2, 0.4], [0.4, 0.6]])), 6, np.array([0.6, 0.8]))
    assert one.models_evaluated.tolist() == [2, 4, 6] and one.test_scores[-1].tolist() == [0.6, 0.8]
    assert with_final(one, 6, np.array([0.0, 0.0])) is one
    two = Curve(np.array([3, 4, 6]), np.array([[0.1, 0.1], [0.2, 0.4], [0.7, 0.9]]))
    x, points = group_points([one, two])
    assert x.tolist() == [4, 6]
    assert [p.mean for p in points] == pytest.approx([(0.5 + 0.3) / 2, (0.7 + 0.8) / 2])
    # two seeds, 0.5 and 0.3: sd/sqrt(n) = 0.1, and Student t with 1 degree of freedom is Cauchy: t = tan(0.475 pi)
    assert points[0].high - points[0].mean == pytest.approx(np.tan(0.475 * np.pi) * 0.1)
    x, points = group_points([two])
    assert x.tolist() == [3, 4, 6] and points[0].low is None
