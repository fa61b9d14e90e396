"""The paper's Table 4 for a run: every model's test scores normalised by each task's expert,
next to the experts' model similarity.

A score normalised by task k's expert is score_k / expert_k's score_k, so 1.0 means the
model does task k as well as the model fine-tuned for it. `analyze` prints this section for
runs whose tasks predict masks (the segmentation runs of section 4.2); the SAM demo checks
its claim with `claim`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import yaml

from cqd_mpi.errors import CqdError

CLAIM_RATIO = 0.95
"""The SAM demo's claim: the aggregate reaches this fraction of every expert on its own task."""


def predicts_masks(config_text: str) -> bool:
    """Whether every task of a run's frozen config calls the mask-prediction capability."""
    from cqd_mpi.engines.base import MaskPrediction
    from cqd_mpi.tasks import task_class

    try:
        tasks = (yaml.safe_load(config_text) or {}).get("tasks") or []
        return bool(tasks) and all(task_class(str(t.get("kind"))).requires is MaskPrediction for t in tasks)
    except (CqdError, yaml.YAMLError, AttributeError, TypeError):
        return False


def rows(report: Mapping) -> list[tuple[str, Mapping]]:
    """(label, entry) of report.json's models in table order: base, experts, naive average, elites, aggregate."""
    found = [("base", report["base"])]
    found += [(f"expert {task}", entry) for task, entry in report["experts"].items()]
    found.append(("naive average", report.get("naive_average")))
    found += [(f"elite {task} (#{entry['id']})", entry) for task, entry in report.get("elites", {}).items()]
    found.append(("CycleQD aggregate", report.get("aggregate")))
    return [(label, entry) for label, entry in found if entry is not None]


def normalised(entry: Mapping, report: Mapping) -> dict[str, float]:
    """entry's test score on each task divided by that task's expert's (NaN where either is missing or 0)."""
    out = {}
    for task in report["tasks"]:
        score, expert = entry["test_scores"].get(task), report["experts"][task]["test_scores"].get(task)
        out[task] = score / expert if score is not None and expert else math.nan
    return out


def claim(report: Mapping, ratio: float = CLAIM_RATIO) -> tuple[bool, str]:
    """Whether the aggregate reaches `ratio` of each expert on its own task and its mean normalised
    score beats the naive average's, with a line that says so."""
    aggregate, average = report.get("aggregate"), report.get("naive_average")
    if aggregate is None or average is None:
        return False, "claim: not checked (the final phase has not evaluated the aggregate and the naive average)"
    ours, theirs = normalised(aggregate, report), normalised(average, report)
    mean_ours, mean_theirs = (sum(v.values()) / len(v) for v in (ours, theirs))
    reached = all(v >= ratio for v in ours.values())
    beats = mean_ours > mean_theirs
    parts = ", ".join(f"{task} {value:.3f}" for task, value in ours.items())
    verdict = "holds" if reached and beats else "does not hold"
    return reached and beats, (
        f"claim {verdict}: the aggregate reaches {parts} of each expert on its own task (>= {ratio} asked: "
        f"{'yes' if reached else 'no'}); mean normalised {mean_ours:.3f} against the naive average's "
        f"{mean_theirs:.3f} ({'beats' if beats else 'does not beat'} it)")


def expert_similarity(run) -> list[tuple[str, str, float | None]]:
    """model_similarity of each pair of experts (None where a model dir is gone)."""
    from cqd_mpi.merging.operators import model_similarity
    from cqd_mpi.merging.weights import ModelDir

    def open_dir(model_id: int):
        try:
            return ModelDir(run.rundir.weights_of(run.models[model_id]))
        except CqdError:
            return None

    base = open_dir(0)
    experts = {name: open_dir(e) for name, e in zip(run.task_names, run.expert_ids)}
    found = []
    for a, b in itertools.combinations(run.task_names, 2):
        if base is None or experts[a] is None or experts[b] is None:
            found.append((a, b, None))
        else:
            found.append((a, b, model_similarity(base=base, a=experts[a], b=experts[b])))
    return found


def section(run, report: Mapping) -> list[str]:
    """The Table-4 lines of `analyze`: normalised test scores, the claim, the experts' similarity."""
    tasks = list(report["tasks"])
    lines = ["Test-split scores normalised by each task's expert (Table 4)",
             f"{'model':<22}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'mean':>11}"]
    for label, entry in rows(report):
        values = normalised(entry, report)
        cells = "".join(f"{values[t]:>11.3f}" if math.isfinite(values[t]) else f"{'-':>11}" for t in tasks)
        finite = [v for v in values.values() if math.isfinite(v)]
        mean = f"{sum(finite) / len(finite):>11.3f}" if len(finite) == len(values) else f"{'-':>11}"
        lines.append(f"{label:<22}{cells}{mean}")
    lines.append(claim(report)[1])
    for a, b, value in expert_similarity(run):
        shown = f"{value:.4f}" if value is not None else "- (a model dir is gone)"
        lines.append(f"model similarity of experts {a} and {b}: {shown}")
    return lines
