"""Table 4 of a run: scores normalised by each task's expert, and the SAM demo's claim."""

import math

import pytest

from cqd_mpi.analysis.normalised import claim, normalised, predicts_masks, rows


def entry(model_id, kind, a, b):
    return {"id": model_id, "kind": kind, "test_scores": {"polyps": a, "camo": b}}


def report(aggregate=(0.76, 0.40), average=(0.70, 0.38)):
    return {
        "tasks": ["polyps", "camo"],
        "base": entry(0, "base", 0.5, 0.1),
        "experts": {"polyps": entry(1, "expert", 0.8, 0.2), "camo": entry(2, "expert", 0.6, 0.4)},
        "naive_average": entry(3, "average", *average) if average else None,
        "elites": {"polyps": entry(1, "expert", 0.8, 0.2)},
        "aggregate": entry(4, "aggregate", *aggregate) if aggregate else None,
    }


def test_scores_are_divided_by_each_tasks_expert():
    r = report()
    assert normalised(r["aggregate"], r) == {"polyps": pytest.approx(0.95), "camo": pytest.approx(1.0)}
    assert normalised(r["experts"]["camo"], r) == {"polyps": pytest.approx(0.75), "camo": pytest.approx(1.0)}
    r["experts"]["camo"]["test_scores"]["camo"] = 0.0
    assert math.isnan(normalised(r["aggregate"], r)["camo"])
    assert [label for label, _ in rows(report())] == ["base", "expert polyps", "expert camo", "naive average",
                                                      "elite polyps (#1)", "CycleQD aggregate"]


def test_the_claim_needs_every_ratio_and_a_win_over_the_naive_average():
    holds, line = claim(report())
    assert holds and line.startswith("claim holds: the aggregate reaches polyps 0.950, camo 1.000")
    holds, line = claim(report(aggregate=(0.75, 0.45)))
    assert not holds and "(>= 0.95 asked: no)" in line and "(beats it)" in line
    holds, line = claim(report(average=(0.78, 0.40)))
    assert not holds and "asked: yes" in line and "does not beat it" in line
    assert claim(report(aggregate=None)) == (False, "claim: not checked (the final phase has not evaluated the "
                                                    "aggregate and the naive average)")


def test_only_runs_whose_tasks_predict_masks_get_the_section():
    assert predicts_masks("tasks:\n- {name: a, kind: segmentation}\n- {name: b, kind: segmentation}\n")
    assert not predicts_masks("tasks:\n- {name: a, kind: segmentation}\n- {name: b, kind: skills}\n")
    assert not predicts_masks("tasks:\n- {name: a, kind: no.such.module:Task}\n")
    assert not predicts_masks("")
    assert not predicts_masks("[unclosed")
