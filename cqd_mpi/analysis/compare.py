"""The paper's Tables 1 and 2 over any set of finished runs: test-split scores of each
method's final model, the experts, the base and the naive average, as mean and standard
deviation over seeds.

Runs are read through run/state.py like every other reader. A run's group is its method
and, for the archive methods (CycleQD, QD), the Table 2 switches (mutation kind, parent
sampling), all read from its state; its seed is `runtime.seed`. The base, the experts and
the naive average are in every run; runs with the same seed share their test split, so
those rows take one value per seed. All runs must have the same tasks; groups whose
budgets (`qd.generations`) differ are flagged, because the comparison is only fair at
equal budgets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from cqd_mpi.errors import StateError
from cqd_mpi.qd.coefficients import CoefficientSearch
from cqd_mpi.qd.records import ModelKind, Phase
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend, from_tree

MUTATION_NAMES = {"none": "no", "gaussian": "Gaussian", "svd": "SVD"}


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One finished run: its group label, seed, budget, and test-split scores (K tasks) of
    the base, each expert, the naive average and the method's final model."""

    path: Path
    label: str
    seed: int
    budget: int
    tasks: tuple[str, ...]
    base: np.ndarray
    experts: dict[str, np.ndarray]
    average: np.ndarray
    final: np.ndarray


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    kind: str
    seeds: tuple[int, ...]
    budget: int | None
    scores: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Per task, then the average over tasks (last entry), each a mean over seeds."""
        return np.append(self.scores.mean(axis=0), self.scores.mean(axis=1).mean())

    @property
    def std(self) -> np.ndarray | None:
        """The sample standard deviations over seeds of the same entries; None for one seed."""
        if len(self.scores) < 2:
            return None
        return np.append(self.scores.std(axis=0, ddof=1), self.scores.mean(axis=1).std(ddof=1))


def group_label(core, config: dict) -> str:
    """'CycleQD + SVD mutation + elite sampling', 'QD + no mutation + random sampling', 'CMA-ES'."""
    if isinstance(core.strategy, CoefficientSearch):
        return core.label
    mutation = ((config.get("qd") or {}).get("mutation") or {}).get("kind", "svd")
    return f"{core.label} + {MUTATION_NAMES.get(mutation, mutation)} mutation + {core.params.sampling} sampling"


def read_run(path: str | Path) -> RunResult:
    """A finished run's results, or StateError naming the run and what is missing."""
    rundir = RunDir(path)
    if not rundir.has_state():
        raise StateError(f"{rundir.path} has no state.h5: it is not a cqd_mpi run dir")
    tree, source = HDF5Backend(rundir.state_path).read()
    core = from_tree(tree)
    if core.phase != Phase.DONE:
        raise StateError(f"{rundir.path} is in phase {core.phase} (generation {core.generations_done} of "
                         f"{core.generations}); compare reads finished runs only")
    try:
        config = yaml.safe_load(str(tree["attrs"].get("config", ""))) or {}
    except yaml.YAMLError as exc:
        raise StateError(f"{source}: the frozen config is not valid YAML: {exc}") from None
    kinds = [r.kind for r in core.models]

    def last(kind: str) -> np.ndarray:
        if kind not in kinds:
            raise StateError(f"{source}: no model of kind {kind!r} in /models")
        scores = core.models[len(kinds) - 1 - kinds[::-1].index(kind)].test_scores
        if not np.all(np.isfinite(scores)):
            raise StateError(f"{source}: the {kind} has no test-split scores")
        return np.asarray(scores, dtype=np.float64)

    return RunResult(path=rundir.path, label=group_label(core, config), seed=int(core.seed),
                     budget=int(core.generations), tasks=tuple(core.task_names),
                     base=np.asarray(core.models[core.base_id].test_scores, dtype=np.float64),
                     experts={n: np.asarray(core.models[e].test_scores, dtype=np.float64)
                              for n, e in zip(core.task_names, core.expert_ids)},
                     average=last(ModelKind.AVERAGE), final=last(ModelKind.AGGREGATE))


def table(results: Sequence[RunResult]) -> list[Row]:
    """The rows: base, experts, naive average (one value per seed), then each method group
    in the order first seen (one value per run)."""
    if not results:
        raise StateError("compare needs at least one run directory")
    tasks = results[0].tasks
    for r in results[1:]:
        if r.tasks != tasks:
            raise StateError(f"{r.path} has tasks {list(r.tasks)}, but {results[0].path} has {list(tasks)}; "
                             "compare runs over the same tasks")
    per_seed: dict[int, RunResult] = {}
    for r in results:
        per_seed.setdefault(r.seed, r)
    seeds = tuple(sorted(per_seed))
    shared = [("base", "base", lambda r: r.base)]
    shared += [(f"expert {t}", "expert", lambda r, t=t: r.experts[t]) for t in tasks]
    shared += [("naive average", "average", lambda r: r.average)]
    rows = [Row(label, kind, seeds, None, np.stack([pick(per_seed[s]) for s in seeds]))
            for label, kind, pick in shared]
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.label, []).append(r)
    for label, runs in groups.items():
        runs = sorted(runs, key=lambda r: r.seed)
        budgets = {r.budget for r in runs}
        seen = [r.seed for r in runs]
        if len(set(seen)) != len(seen):
            raise StateError(f"{label}: several runs with the same seed ({', '.join(str(r.path) for r in runs)}); "
                             "give one run per method and seed")
        rows.append(Row(label, "method", tuple(seen), budgets.pop() if len(budgets) == 1 else -1,
                        np.stack([r.final for r in runs])))
    return rows


def budget_note(rows: Sequence[Row]) -> str | None:
    """A warning when the methods' budgets differ (or differ between the seeds of one)."""
    budgets = {row.label: row.budget for row in rows if row.kind == "method"}
    if len(set(budgets.values())) <= 1 and -1 not in budgets.values():
        return None
    listed = ", ".join(f"{label}: {'mixed' if b == -1 else b}" for label, b in budgets.items())
    return f"note: the methods' budgets (models evaluated in the search) differ, so the comparison is not fair: {listed}"


def _cell(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" if std is None or not math.isfinite(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_markdown(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    header = ["#", "model", *tasks, "Avg", "seeds", "budget"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        std = row.std
        cells = [_cell(m, None if std is None else s) for m, s in zip(row.mean, std if std is not None else row.mean)]
        budget = "" if row.budget is None else ("mixed" if row.budget == -1 else str(row.budget))
        lines.append("| " + " | ".join([str(i), row.label, *cells, str(len(row.seeds)), budget]) + " |")
    note = budget_note(rows)
    tail = [f"Test-split scores (%), mean ± standard deviation over seeds {', '.join(map(str, rows[0].seeds))}."]
    return "\n".join(lines + [""] + tail + ([note] if note else []))


def format_csv(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "kind", "seeds", "budget", *(f"{t}_mean" for t in tasks), "avg_mean",
                     *(f"{t}_std" for t in tasks), "avg_std"])
    for row in rows:
        std = row.std
        writer.writerow([row.label, row.kind, " ".join(map(str, row.seeds)), "" if row.budget is None else row.budget,
                         *(f"{m:.6f}" for m in row.mean),
                         *((f"{s:.6f}" for s in std) if std is not None else [""] * (len(tasks) + 1))])
    return out.getvalue().rstrip("\n")


def as_json(rows: Sequence[Row], tasks: Sequence[str], results: Sequence[RunResult]) -> dict:
    def entry(row: Row) -> dict:
        std = row.std
        return {"model": row.label, "kind": row.kind, "seeds": list(row.seeds), "budget": row.budget,
                "mean": dict(zip([*tasks, "avg"], map(float, row.mean))),
                "std": None if std is None else dict(zip([*tasks, "avg"], map(float, std))),
                "per_seed": [dict(zip(tasks, map(float, s))) for s in row.scores]}

    return {"tasks": list(tasks), "runs": [{"path": str(r.path), "model": r.label, "seed": r.seed,
                                            "budget": r.budget} for r in results],
            "rows": [entry(row) for row in rows], "note": budget_note(rows)}


def bar_chart(rows: Sequence[Row], tasks: Sequence[str], out: str | Path) -> Path:
    """Grouped bars (one per task and the average) for every row, with the seeds' standard
    deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*tasks, "Avg"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    positions = np.arange(len(rows))
    for j, label in enumerate(labels):
        means = [100 * row.mean[j] for row in rows]
        errors = [100 * row.std[j] if row.std is not None else 0.0 for row in rows]
        ax.bar(positions + (j - (len(labels) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=label,
               hatch="//" if label == "Avg" else None)
    ax.set_xticks(positions)
    ax.set_xticklabels([row.label.replace(" + ", "\n+ ") for row in rows], fontsize=7)
    ax.set_ylabel("test-split score (%)")
    ax.set_title(f"Test-split scores, mean ± sd over {len(rows[0].seeds)} seed(s)")
    ax.legend(fontsize=7, ncols=len(labels))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
