"""`compare --budget-curve`: test-split mean of the would-be final model against models
evaluated, per method (the paper's Figure 5).

A run records these periodic test scores in its state when `runtime.test_every: N` is set:
state.h5's group `curve` holds `models_evaluated` (int64 [P], increasing: the search's models
evaluated when the point was taken) and `test_scores` (float64 [P, K], the would-be final
model's test-split metric per task, task order as /attrs/task_names). The evaluations are not
counted in the budget. A run's final model, evaluated on the test split at the end, is the
curve's point at its budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cqd_mpi.analysis.uncertainty import interval
from cqd_mpi.errors import StateError

SETTING = "runtime.test_every"


@dataclasses.dataclass(frozen=True)
class Curve:
    models_evaluated: np.ndarray
    test_scores: np.ndarray


def read_curve(tree: Mapping, source, k: int) -> Curve | None:
    """The periodic test scores a state tree holds, None where the run took none, or
    StateError naming the dataset that does not fit the layout."""
    group = tree.get("curve")
    if group is None:
        return None
    if "models_evaluated" not in group or "test_scores" not in group:
        raise StateError(f"{source}: the group curve needs datasets models_evaluated and test_scores, "
                         f"got {sorted(k for k in group if k != 'attrs')}")
    x = np.asarray(group["models_evaluated"])
    y = np.asarray(group["test_scores"], dtype=np.float64)
    if x.ndim != 1 or x.dtype.kind not in "iu" or np.any(np.diff(x) <= 0) or np.any(x < 0):
        raise StateError(f"{source}: curve/models_evaluated must be increasing non-negative integers [P], "
                         f"got {x.dtype} {list(x.shape)}")
    if y.shape != (len(x), k) or not np.all(np.isfinite(y)):
        raise StateError(f"{source}: curve/test_scores must be finite [{len(x)}, {k}] (points x tasks), "
                         f"got {list(y.shape)}")
    return Curve(models_evaluated=x.astype(np.int64), test_scores=y)


def with_final(curve: Curve, budget: int, final: np.ndarray) -> Curve:
    """The curve ending with the final model at the budget (when its last point is earlier)."""
    if len(curve.models_evaluated) and curve.models_evaluated[-1] >= budget:
        return curve
    return Curve(np.append(curve.models_evaluated, budget), np.vstack([curve.test_scores, final[None]]))


def missing_line(paths: Sequence[Path]) -> str:
    return (f"--budget-curve plots the runs' periodic test scores (state.h5 datasets curve/models_evaluated, "
            f"curve/test_scores), which a run records with {SETTING}: N (every N models evaluated); "
            f"none of these runs has them: {', '.join(map(str, paths))}")


def group_points(curves: Sequence[Curve]) -> tuple[np.ndarray, list]:
    """The models-evaluated counts every seed's curve has, and at each the interval over seeds
    of the test mean over tasks."""
    common = curves[0].models_evaluated
    for c in curves[1:]:
        common = np.intersect1d(common, c.models_evaluated)
    points = []
    for x in common:
        values = [c.test_scores[int(np.flatnonzero(c.models_evaluated == x)[0])].mean() for c in curves]
        points.append(interval(values))
    return common, points


def plot(groups: Mapping[str, Sequence[Curve]], out: str | Path, *, average: float | None = None) -> Path:
    """One line per method (mean over its seeds, with the 95% interval shaded where it has two
    or more), the naive average's test mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for label, curves in groups.items():
        x, points = group_points(curves)
        line, = ax.plot(x, [100 * p.mean for p in points], marker="o", markersize=3,
                        label=f"{label} ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
        if all(p.low is not None for p in points) and len(points):
            ax.fill_between(x, [100 * p.low for p in points], [100 * p.high for p in points],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if average is not None:
        ax.axhline(100 * average, color="grey", linestyle="--", linewidth=1, label="naive average")
    ax.set_xlabel("models evaluated in the search")
    ax.set_ylabel("test-split mean over tasks (%)")
    ax.set_title("Test mean against budget (shaded: 95% CI over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from cqd_mpi.analysis.plots import save_figure

    out = save_figure(fig, out, dpi=120)
    plt.close(fig)
    return out
