"""A run's results: report.json (test-split scores of the models a run ends with), its
plain-text table, and the time breakdown."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cqd_mpi.qd.records import ModelKind
from cqd_mpi.qd.search import Search
from cqd_mpi.run import keeping


def build_report(core: Search) -> dict:
    """Test-split scores of the base, experts, naive average, elites and aggregate."""
    paths = keeping.paths(core)

    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    def entry(m: int) -> dict:
        r = core.models[m]
        return {"id": m, "kind": str(r.kind), "path": paths[m],
                "test_scores": {n: number(s) for n, s in zip(core.task_names, r.test_scores)},
                "mean": number(float(np.mean(r.test_scores))),
                "search_scores": {n: number(s) for n, s in zip(core.task_names, r.scores)}}

    by_kind = {kind.value: [r.id for r in core.models if r.kind == kind] for kind in ModelKind}
    return {
        "method": core.method,
        "final_label": core.final_label,
        "tasks": list(core.task_names),
        "generations": core.generations_done,
        "base": entry(core.base_id),
        "experts": {n: entry(e) for n, e in zip(core.task_names, core.expert_ids)},
        "naive_average": entry(by_kind["average"][-1]) if by_kind["average"] else None,
        "elites": {n: entry(e) for n, e in zip(core.task_names, core.elites())} if core.archives else {},
        "aggregate": entry(by_kind["aggregate"][-1]) if by_kind["aggregate"] else None,
        "aggregate_betas": [float(b) for b in core.aggregate_betas()] if core.archives else [],
    }


def _row(label: str, entry: Mapping | None, tasks: list[str]) -> str:
    if entry is None:
        return f"{label:<22}" + "".join(f"{'-':>9}" for _ in tasks) + f"{'-':>9}"
    cells = "".join(
        f"{entry['test_scores'][t]:>9.3f}" if entry["test_scores"][t] is not None else f"{'-':>9}"
        for t in tasks)
    mean = entry.get("mean")
    return f"{label:<22}{cells}{(f'{mean:>9.3f}' if mean is not None else f'{chr(45):>9}')}"


def format_report(report: Mapping) -> str:
    """The final table: test-split scores of base, experts, naive average, elites, aggregate."""
    tasks = list(report["tasks"])
    lines = [f"Test-split scores after {report['generations']} generations",
             f"{'model':<22}" + "".join(f"{t[:8]:>9}" for t in tasks) + f"{'mean':>9}"]
    lines.append(_row("base", report["base"], tasks))
    for task, entry in report["experts"].items():
        lines.append(_row(f"expert {task}", entry, tasks))
    lines.append(_row("naive average", report.get("naive_average"), tasks))
    for task, entry in report.get("elites", {}).items():
        lines.append(_row(f"elite {task} (#{entry['id']})", entry, tasks))
    lines.append(_row(report.get("final_label", "CycleQD aggregate"), report.get("aggregate"), tasks))
    aggregate = report.get("aggregate")
    if aggregate and aggregate.get("mean") is not None:
        rivals = [("naive average", report.get("naive_average"))] + [
            (f"expert {t}", e) for t, e in report["experts"].items()]
        beaten = [name for name, e in rivals if e and e.get("mean") is not None and aggregate["mean"] > e["mean"]]
        lines.append(f"aggregate mean beats {len(beaten)}/{len(rivals)}: "
                     f"{', '.join(beaten) if beaten else 'none'}")
    return "\n".join(lines)


def format_times(phase_seconds: Mapping[str, float], wall: float) -> str:
    """The run's wall time by phase. With a pipeline the conductor merges the next child while
    workers evaluate, so the phases can add up to more than the wall time: that excess is
    shown as `overlapped`, never as a negative remainder."""
    parts = " ".join(f"{k}={v:.1f}s" for k, v in phase_seconds.items())
    remainder = wall - sum(phase_seconds.values())
    tail = f"other={remainder:.1f}s" if remainder >= 0 else f"other=0.0s overlapped={-remainder:.1f}s"
    return f"time: wall={wall:.1f}s {parts} {tail}"
