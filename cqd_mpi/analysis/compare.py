"""The paper's Tables 1 and 2 over any set of finished runs: test-split scores of each
method's final model, the experts, the base and the naive average, as the mean over seeds
with its 95% confidence interval, each row's paired differences against a reference method
(CycleQD by default), and each method's cost (models evaluated, search time).

Runs are read through run/state.py like every other reader. A run's group is its method
and, for the archive methods (CycleQD, QD), the Table 2 switches (mutation kind, parent
sampling), all read from its state; its seed is `runtime.seed`. The base, the experts and
the naive average are in every run; runs with the same seed share their test split, so
those rows take one value per seed, and any two rows are compared seed by seed
(analysis/uncertainty.py). All runs must have the same tasks; groups whose budgets
(`qd.generations`) differ are flagged, because the comparison is only fair at equal budgets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from cqd_mpi.analysis.budget_curve import Curve, read_curve
from cqd_mpi.analysis.uncertainty import ONE_SEED, Interval, Paired, interval, paired
from cqd_mpi.errors import StateError, yaml_problem
from cqd_mpi.qd.coefficients import CoefficientSearch
from cqd_mpi.qd.records import ModelKind, Phase
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend, from_tree

MUTATION_NAMES = {"none": "no", "gaussian": "Gaussian", "svd": "SVD"}


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One finished run: its group label, seed, budget, and test-split scores (K tasks) of
    the base, each expert, the naive average and the method's final model; its method, the
    search's models evaluated and their summed times (NaN where the state has no timings),
    and its periodic test scores where it took them."""

    path: Path
    label: str
    seed: int
    budget: int
    tasks: tuple[str, ...]
    base: np.ndarray
    experts: dict[str, np.ndarray]
    average: np.ndarray
    final: np.ndarray
    method: str = ""
    models_evaluated: int = 0
    search_seconds: float = math.nan
    curve: Curve | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: `scores` [seeds, K]; for a method group also each run's models
    evaluated and search seconds, in seed order."""

    label: str
    kind: str
    seeds: tuple[int, ...]
    budget: int | None
    scores: np.ndarray
    method: str | None = None
    models: tuple[int, ...] = ()
    seconds: tuple[float, ...] = ()

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

    @property
    def columns(self) -> np.ndarray:
        """[seeds, K + 1]: the per-seed scores of each task, then their mean over tasks."""
        return np.column_stack([self.scores, self.scores.mean(axis=1)])

    @property
    def intervals(self) -> list[Interval]:
        """The 95% confidence interval over seeds of each entry of `mean`."""
        return [interval(column) for column in self.columns.T]


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
        raise StateError(f"{source}: the frozen config is not valid YAML: {yaml_problem(exc)}") from None
    kinds = [r.kind for r in core.models]

    def last(kind: str) -> np.ndarray:
        if kind not in kinds:
            raise StateError(f"{source}: no model of kind {kind!r} in /models")
        scores = core.models[len(kinds) - 1 - kinds[::-1].index(kind)].test_scores
        if not np.all(np.isfinite(scores)):
            raise StateError(f"{source}: the {kind} has no test-split scores")
        return np.asarray(scores, dtype=np.float64)

    timings = [row.total_s for row in core.history]
    extra = {"method": str(core.label), "models_evaluated": len(core.history),
             "search_seconds": float(np.sum(timings)) if timings else math.nan,
             "curve": read_curve(tree, source, len(core.task_names))}
    return RunResult(**extra, path=rundir.path, label=group_label(core, config), seed=int(core.seed),
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
                        np.stack([r.final for r in runs]), method=runs[0].method,
                        models=tuple(r.models_evaluated for r in runs),
                        seconds=tuple(r.search_seconds for r in runs)))
    return rows


PAPER_CYCLEQD = "CycleQD + SVD mutation + elite sampling"


def reference_row(rows: Sequence[Row], label: str | None = None) -> Row | None:
    """The row every other is paired against: the one labelled `label` (StateError if none
    is), else the CycleQD group (with several, the paper's SVD mutation + elite sampling one;
    StateError asking for --reference if that is absent too), else None."""
    by_label = {row.label: row for row in rows}
    if label is not None:
        if label not in by_label:
            raise StateError(f"--reference {label!r} is not a row of the table; the rows are: {', '.join(by_label)}")
        return by_label[label]
    cycleqd = [row for row in rows if row.method == "CycleQD"]
    if len(cycleqd) == 1:
        return cycleqd[0]
    if PAPER_CYCLEQD in by_label:
        return by_label[PAPER_CYCLEQD]
    if cycleqd:
        raise StateError(f"the runs hold several CycleQD groups ({', '.join(r.label for r in cycleqd)}) and "
                         "none is the paper's; name the reference with --reference LABEL")
    return None


def pairs(rows: Sequence[Row], reference: Row | None) -> dict[str, list[Paired]]:
    """For each row but the reference, its paired comparison with it on every entry (each task,
    then the mean over tasks) over the seeds both have; none without a reference."""
    if reference is None:
        return {}
    out = {}
    ref = dict(zip(reference.seeds, reference.columns))
    for row in rows:
        if row is reference:
            continue
        common = [i for i, s in enumerate(row.seeds) if s in ref]
        seeds = [row.seeds[i] for i in common]
        if not seeds:
            out[row.label] = []
            continue
        mine = row.columns[common]
        theirs = np.stack([ref[s] for s in seeds])
        out[row.label] = [paired(seeds, mine[:, j], theirs[:, j]) for j in range(mine.shape[1])]
    return out


def reference_note(reference: Row | None) -> str | None:
    if reference is None:
        return ("no paired differences: the runs hold no CycleQD group; name a row to compare against "
                "with --reference LABEL")
    if len(reference.seeds) < 2:
        return f"paired differences against {reference.label} have no interval: {ONE_SEED}"
    return None


def budget_note(rows: Sequence[Row]) -> str | None:
    """A warning when the methods' budgets differ (or differ between the seeds of one)."""
    budgets = {row.label: row.budget for row in rows if row.kind == "method"}
    if len(set(budgets.values())) <= 1 and -1 not in budgets.values():
        return None
    listed = ", ".join(f"{label}: {'mixed' if b == -1 else b}" for label, b in budgets.items())
    return f"note: the methods' budgets (models evaluated in the search) differ, so the comparison is not fair: {listed}"


def _pct(value: float | None, sign: bool = False) -> str:
    return "" if value is None else f"{100 * value:{'+' if sign else ''}.1f}"


def _cell(entry: Interval, sign: bool = False) -> str:
    """'62.0 [55.1, 68.9]' (%), the mean alone for one seed."""
    if entry.low is None:
        return _pct(entry.mean, sign)
    return f"{_pct(entry.mean, sign)} [{_pct(entry.low, sign)}, {_pct(entry.high, sign)}]"


def _models(row: Row) -> str:
    """The models evaluated per run: one number, or the range where the seeds' runs differ."""
    if not row.models:
        return ""
    low, high = min(row.models), max(row.models)
    return str(low) if low == high else f"{low}-{high}"


def _seconds(row: Row) -> str:
    if not row.seconds:
        return ""
    if not all(map(math.isfinite, row.seconds)):
        return "n/a"
    mean = float(np.mean(row.seconds))
    return f"{mean:.0f}" if mean >= 100 else f"{mean:.1f}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.2g}" if value >= 0.001 else "<0.001")


NOTES = (
    "Test-split scores (%): the mean over seeds with its 95% confidence interval [low, high] (Student t with "
    "n-1 degrees of freedom on the n per-seed scores; Avg is the per-seed mean over tasks); a row with one "
    "seed shows the mean alone: the spread over seeds is unknown. models: the search's models evaluated per "
    "run (the budget); search s: the sum over those models of their time from merge start to saved "
    "(history total_s), mean per run, which is the wall time with one eval group and no pipeline (n/a: the "
    "state records no timings).")


def format_markdown(rows: Sequence[Row], tasks: Sequence[str], *, reference: Row | None = None,
                    compared: dict[str, list[Paired]] | None = None) -> str:
    header = ["#", "model", *tasks, "Avg", "seeds", "models", "search s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [_cell(entry) for entry in row.intervals]
        lines.append("| " + " | ".join([str(i), row.label, *cells, str(len(row.seeds)), _models(row),
                                        _seconds(row)]) + " |")
    tail = [f"Seeds {', '.join(map(str, rows[0].seeds))}. {NOTES}"]
    for note in (budget_note(rows), reference_note(reference) if compared is not None else None):
        if note:
            tail.append(note)
    if reference is not None and compared:
        head = ["model", "seeds", *tasks, "Avg", "p (paired t, Avg)", "+/-/= (Avg)", "verdict (Avg)"]
        tail += ["", f"Paired differences against {reference.label} (points, row minus reference, seed by seed):",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, entries in compared.items():
            if not entries:
                tail.append(f"| {label} | 0 |" + " |" * (len(tasks) + 4))
                continue
            avg = entries[-1]
            tail.append("| " + " | ".join([label, str(len(avg.seeds)), *(_cell(e.difference, True) for e in entries),
                                           _p(avg.p_value), f"{avg.higher}/{avg.lower}/{avg.ties}",
                                           avg.verdict if avg.difference.low is not None else "one seed"]) + " |")
        tail += ["", "A cell is the mean per-seed difference with its 95% interval (Student t on the per-seed "
                 "differences); p: the paired t-test's two-sided p-value on Avg; +/-/=: seeds where the row is "
                 "higher, lower, equal (the sign test's counts). A difference is resolved (higher, lower) only "
                 "when its interval excludes zero; otherwise unresolved."]
    return "\n".join([*lines, "", *tail])


STATS = ("mean", "std", "low", "high", "diff", "diff_low", "diff_high", "p", "higher", "lower", "ties", "sign_p")


def _stat_values(row: Row, entries: list[Paired] | None) -> dict[str, list]:
    """Every STATS column of a row, one value per task and the average ('' where none)."""
    n = row.scores.shape[1] + 1
    std = row.std
    blank = [""] * n
    out = {"mean": [f"{m:.6f}" for m in row.mean],
           "std": [f"{v:.6f}" for v in std] if std is not None else blank,
           "low": [f"{e.low:.6f}" if e.low is not None else "" for e in row.intervals],
           "high": [f"{e.high:.6f}" if e.high is not None else "" for e in row.intervals]}
    if not entries:
        return {**out, **{key: blank for key in STATS[4:]}}
    out["diff"] = [f"{e.difference.mean:.6f}" for e in entries]
    out["diff_low"] = [f"{e.difference.low:.6f}" if e.difference.low is not None else "" for e in entries]
    out["diff_high"] = [f"{e.difference.high:.6f}" if e.difference.high is not None else "" for e in entries]
    out["p"] = [f"{e.p_value:.6g}" if e.p_value is not None else "" for e in entries]
    out["sign_p"] = [f"{e.sign_p:.6g}" if e.sign_p is not None else "" for e in entries]
    for key in ("higher", "lower", "ties"):
        out[key] = [str(getattr(e, key)) for e in entries]
    return out


def format_csv(rows: Sequence[Row], tasks: Sequence[str], *, reference: Row | None = None,
               compared: dict[str, list[Paired]] | None = None) -> str:
    """One line per row: the seeds' mean, sd and 95% interval per task and avg, the paired
    difference against `reference` (diff, its interval, the t-test's p, the sign counts and
    the sign test's p), the models evaluated (per run, space-separated) and mean search seconds."""
    import csv
    import io

    compared = compared or {}
    entries = [*tasks, "avg"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "kind", "seeds", "budget", "models_evaluated", "search_s", "reference",
                     *(f"{e}_{stat}" for stat in STATS for e in entries)])
    for row in rows:
        values = _stat_values(row, compared.get(row.label))
        writer.writerow([row.label, row.kind, " ".join(map(str, row.seeds)), "" if row.budget is None else row.budget,
                         " ".join(map(str, row.models)), _seconds(row),
                         "" if reference is None or row is reference else reference.label,
                         *(v for stat in STATS for v in values[stat])])
    return out.getvalue().rstrip("\n")


def _interval_json(entry: Interval) -> dict:
    return {"mean": entry.mean, "n": entry.n, "low": entry.low, "high": entry.high, "note": entry.reason}


def as_json(rows: Sequence[Row], tasks: Sequence[str], results: Sequence[RunResult], *,
            reference: Row | None = None, compared: dict[str, list[Paired]] | None = None) -> dict:
    names = [*tasks, "avg"]
    compared = compared or {}

    def finite(value: float) -> float | None:
        return float(value) if math.isfinite(value) else None

    def entry(row: Row) -> dict:
        std = row.std
        paired_entries = compared.get(row.label)
        return {"model": row.label, "kind": row.kind, "method": row.method, "seeds": list(row.seeds),
                "budget": row.budget, "models_evaluated": list(row.models),
                "search_seconds": [finite(s) for s in row.seconds],
                "mean": dict(zip(names, map(float, row.mean))),
                "std": None if std is None else dict(zip(names, map(float, std))),
                "interval": dict(zip(names, map(_interval_json, row.intervals))),
                "paired": None if not paired_entries else {
                    name: {"seeds": list(p.seeds), "difference": _interval_json(p.difference), "p_value": p.p_value,
                           "higher": p.higher, "lower": p.lower, "ties": p.ties, "sign_p": p.sign_p,
                           "verdict": p.verdict} for name, p in zip(names, paired_entries)},
                "per_seed": [dict(zip(tasks, map(float, s))) for s in row.scores]}

    return {"tasks": list(tasks), "level": 0.95,
            "interval": "Student t, n-1 degrees of freedom, on the per-seed scores",
            "paired_test": "paired t-test (two-sided) and sign test (exact binomial) on the per-seed differences",
            "reference": None if reference is None else reference.label,
            "runs": [{"path": str(r.path), "model": r.label, "seed": r.seed, "budget": r.budget,
                      "models_evaluated": r.models_evaluated, "search_seconds": finite(r.search_seconds),
                      "curve_points": None if r.curve is None else len(r.curve.models_evaluated)} for r in results],
            "rows": [entry(row) for row in rows], "note": budget_note(rows),
            "reference_note": reference_note(reference)}


def bar_chart(rows: Sequence[Row], tasks: Sequence[str], out: str | Path) -> Path:
    """Grouped bars (one per task and the average) for every row, with the half-width of the
    95% confidence interval over seeds as error bars (none for one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*tasks, "Avg"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    positions = np.arange(len(rows))
    for j, label in enumerate(labels):
        means = [100 * row.mean[j] for row in rows]
        errors = [100 * (row.intervals[j].high - row.intervals[j].mean) if len(row.seeds) > 1 else 0.0
                  for row in rows]
        ax.bar(positions + (j - (len(labels) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=label,
               hatch="//" if label == "Avg" else None)
    ax.set_xticks(positions)
    ax.set_xticklabels([row.label.replace(" + ", "\n+ ") for row in rows], fontsize=7)
    ax.set_ylabel("test-split score (%)")
    ax.set_title(f"Test-split scores, mean and 95% CI over {len(rows[0].seeds)} seed(s)")
    ax.legend(fontsize=7, ncols=len(labels))
    fig.tight_layout()
    from cqd_mpi.analysis.plots import save_figure

    out = save_figure(fig, out, dpi=120)
    plt.close(fig)
    return out
