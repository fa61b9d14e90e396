"""`kind: lm-eval`: the documents of any lm-evaluation-harness task as a task's items.

`task.py` is the task kind, `resolve.py` finds and checks lm-eval tasks (TaskManager, the
refusals), `adapter.py` serves the worker's live engine to lm-eval as its `LM`. lm-eval is an
optional dependency (the `lm-eval` extra), imported only through `require()`.
"""

from __future__ import annotations

from cqd_mpi.errors import require as _require


def require(feature: str = "kind 'lm-eval'"):
    """The lm_eval package (its evaluator and tasks loaded), or MissingDependency naming the extra."""
    lm_eval = _require("lm_eval", extra="lm-eval", feature=feature)
    _require("lm_eval.evaluator", extra="lm-eval", feature=feature)
    _require("lm_eval.tasks", extra="lm-eval", feature=feature)
    return lm_eval
