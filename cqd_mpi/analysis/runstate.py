"""A run as data for analysis: state.h5 read once, archives replayed to any generation,
progress curves, the lineage of models and a text summary.

The state file is read into memory in one go and closed (h5py with locking off), so reading
never blocks the writer, which replaces state.h5 atomically; a run in progress is seen as of
its last checkpoint. Archives at past generations are rebuilt by replaying the insertions in
the order the run made them: the experts first (in expert order), then each generation's
child, each offered to every archive with strict improvement. Every model's scores are stored,
so the replay at the last generation equals the stored archives exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cqd_mpi.analysis import normalised
from cqd_mpi.errors import StateError
from cqd_mpi.qd.archive import Archive, Bins
from cqd_mpi.qd.records import ModelKind, Phase
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend, from_tree

log = logging.getLogger("cqd_mpi.analysis.runstate")

TIMING_PHASES = ("merge", "transfer", "eval")


class RunState:
    """A consistent in-memory snapshot of one run directory: the core as state.h5 holds it
    (read through run/state.py, the one reader of the file) and the file's root attributes."""

    def __init__(self, *, path: str | Path, tree: dict, source: Path | None = None):
        self.rundir = RunDir(path)
        self.tree = tree
        self.source = source or self.rundir.state_path
        self.core = from_tree(tree)
        self.task_names: list[str] = list(self.core.task_names)
        self.phase = self.core.phase
        self.generations = self.core.generations
        self.generations_done = self.core.generations_done
        self.models = self.core.models
        self.kinds: list[str] = [r.kind for r in self.models]
        self.kept: list[bool] = [bool(x) for x in tree["models"]["saved"]]
        """Whether the run keeps each model's weights, as the store recorded it (run/keeping.py)."""
        self.scores = np.array([r.scores for r in self.models], dtype=np.float64).reshape(len(self.kinds), self.k)
        self.test_scores = np.array([r.test_scores for r in self.models],
                                    dtype=np.float64).reshape(len(self.kinds), self.k)
        self.history = self.core.history
        self.bins: list[Bins | None] = list(self.core.bins)

    @classmethod
    def load(cls, run_dir: str | Path) -> RunState:
        """Read RUN_DIR/state.h5 (or, if that is unreadable, the previous checkpoint state.h5.bak)."""
        rundir = RunDir(run_dir)
        if not rundir.path.is_dir():
            raise StateError(f"run dir {rundir.path} does not exist")
        if not rundir.has_state():
            raise StateError(f"{rundir.path} has no state.h5: it is not a cqd_mpi run dir, or its run has "
                             "not written its first checkpoint yet")
        tree, source = HDF5Backend(rundir.state_path).read()
        return cls(path=rundir.path, tree=tree, source=source)

    @property
    def path(self) -> Path:
        return self.rundir.path

    @property
    def k(self) -> int:
        return len(self.task_names)

    @property
    def expert_ids(self) -> list[int]:
        return list(range(1, self.k + 1))

    @property
    def in_progress(self) -> bool:
        return self.phase in (Phase.INIT, Phase.SEARCH)

    @property
    def has_archives(self) -> bool:
        """False until the experts are scored and the bins are set (phase init)."""
        return self.phase != Phase.INIT and bool(self.core.archives) and all(b is not None for b in self.bins)

    @property
    def config_text(self) -> str:
        return str(self.tree["attrs"].get("config", ""))

    def task_index(self, name: str) -> int:
        if name not in self.task_names:
            raise StateError(f"unknown task {name!r}: the run at {self.path} has tasks {', '.join(self.task_names)}")
        return self.task_names.index(name)

    def check_model(self, model_id: int) -> int:
        if not 0 <= model_id < len(self.kinds):
            raise StateError(f"unknown model id {model_id}: the run at {self.path} has models 0..{len(self.kinds) - 1}")
        return model_id

    def describe(self, model_id: int) -> str:
        """'expert beta (#2)', 'child #9 (gen 6)', 'base (#0)', ..."""
        kind = self.kinds[model_id]
        if kind == ModelKind.EXPERT:
            return f"expert {self.task_names[model_id - 1]} (#{model_id})"
        if kind == ModelKind.CHILD:
            return f"child #{model_id} (gen {self.models[model_id].generation})"
        return f"{kind} (#{model_id})"

    def format_scores(self, values: Sequence[float]) -> str:
        return " ".join(f"{n}={v:.3f}" if np.isfinite(v) else f"{n}=-" for n, v in zip(self.task_names, values))

    # archives -------------------------------------------------------------------------------

    def empty_archives(self) -> list[Archive]:
        if not self.has_archives:
            raise StateError(f"the run at {self.path} is in phase {self.phase}: it has no archives yet "
                             "(they start once every expert is scored)")
        return [Archive(quality_task=q, bc_tasks=[t for t in range(self.k) if t != q],
                        bins=[self.bins[t] for t in range(self.k) if t != q])
                for q in range(self.k)]

    def stored_archives(self) -> list[Archive]:
        """The archives as checkpointed (at generation `generations_done`)."""
        self.empty_archives()
        return [_copy_archive(a) for a in self.core.archives]

    def replay(self) -> Iterator[tuple[int, list[Archive]]]:
        """Yield (generation, archives) after the experts (generation 0) and after each
        generation's child; the same archive objects are updated in place."""
        self.empty_archives()
        for (generation, archives, entered), row in zip(self.core.replay(), [None, *self.history]):
            if row is not None and not np.array_equal(entered, np.asarray(row.entered, dtype=bool)):
                raise StateError(f"{self.source}: replaying generation {row.generation} (child {row.child_id}) "
                                 f"enters {entered.tolist()}, but the history says {list(row.entered)}; "
                                 "the state file is inconsistent")
            yield generation, archives

    def check_generation(self, generation: int | None) -> int:
        if generation is None:
            return self.generations_done
        if not 0 <= generation <= self.generations_done:
            raise StateError(f"--generation: expected a generation in 0..{self.generations_done} "
                             f"(generations done in {self.path}), got {generation}")
        return generation

    def archives_at(self, generations: Sequence[int]) -> dict[int, list[Archive]]:
        """Deep copies of the archives as they were at each of `generations`."""
        wanted = {self.check_generation(g) for g in generations}
        found = {}
        for generation, archives in self.replay():
            if generation in wanted:
                found[generation] = [_copy_archive(a) for a in archives]
            if len(found) == len(wanted):
                break
        return found

    def progress(self, until: int | None = None) -> Progress:
        """QD score, coverage and best quality of every archive at generations 0..until."""
        until = self.check_generation(until)
        rows = []
        for generation, archives in self.replay():
            if generation > until:
                break
            rows.append((generation, [a.qd_score() for a in archives], [a.coverage() for a in archives],
                         [float(np.nanmax(a.quality)) for a in archives]))
        generation, qd, coverage, best = zip(*rows)
        return Progress(generation=np.array(generation), qd_score=np.array(qd), coverage=np.array(coverage),
                        best_quality=np.array(best))

    def expert_cells(self, archive: Archive) -> list[tuple[int, ...]]:
        """The cell of each expert (in expert order) in `archive`, whether it still holds it or not."""
        return [archive.cell(self.scores[e]) for e in self.expert_ids]

    def timings(self, until: int | None = None) -> dict[str, np.ndarray]:
        """Per-generation seconds: generation, merge, transfer, eval, total (NaN where unknown)."""
        until = self.check_generation(until)
        rows = [row for row in self.history if row.generation <= until]
        out = {"generation": np.array([row.generation for row in rows], dtype=np.int64)}
        for key in (*TIMING_PHASES, "total"):
            out[key] = np.array([getattr(row, f"{key}_s") for row in rows], dtype=np.float64)
        return out

    # lineage --------------------------------------------------------------------------------

    def parents(self, model_id: int) -> tuple[int, ...]:
        if self.kinds[model_id] != ModelKind.CHILD:
            return ()
        return self.models[model_id].parent1, self.models[model_id].parent2

    def ancestors(self, model_id: int) -> set[int]:
        """Every model the given one descends from (experts included)."""
        seen: set[int] = set()
        todo = list(self.parents(self.check_model(model_id)))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(self.parents(m))
        return seen

    def lineage_lines(self, model_id: int, *, shown: set[int] | None = None,
                      max_depth: int | None = None) -> list[str]:
        """An indented tree of a model's parents back to the experts. A model already printed
        (in this tree or in `shown`) is referred to instead of repeated; below `max_depth`
        levels, ancestors are only counted."""
        shown = set() if shown is None else shown
        lines: list[str] = []

        def label(m: int) -> str:
            text = f"{self.describe(m)} {self.format_scores(self.scores[m])}"
            if self.kinds[m] == ModelKind.CHILD:
                w1, w2 = self.models[m].w1, self.models[m].w2
                active = self.task_names[self.models[m].active_task]
                text += f"  w1={w1:.3f} w2={w2:.3f} active={active}"
            return text

        def walk(m: int, prefix: str, branch: str, rest: str, depth: int) -> None:
            if m in shown and self.parents(m):
                text = label(m) if not prefix and not branch else self.describe(m)
                lines.append(f"{prefix}{branch}{text} (parents shown above)")
                return
            lines.append(f"{prefix}{branch}{label(m)}")
            if max_depth is not None and depth >= max_depth and self.parents(m):
                lines[-1] += f"  (+{len(self.ancestors(m))} more ancestors)"
                return
            shown.add(m)
            parents = self.parents(m)
            if len(parents) == 2 and parents[0] == parents[1]:
                parents = parents[:1]
                lines[-1] += "  (both parents the same model)"
            for i, p in enumerate(parents):
                last = i == len(parents) - 1
                walk(p, prefix + rest, "└─ " if last else "├─ ", "   " if last else "│  ", depth + 1)

        walk(self.check_model(model_id), "", "", "", 0)
        return lines


@dataclasses.dataclass(frozen=True)
class Progress:
    """Per-generation curves; qd_score, coverage and best_quality are (generations, K)."""

    generation: np.ndarray
    qd_score: np.ndarray
    coverage: np.ndarray
    best_quality: np.ndarray


def _copy_archive(archive: Archive) -> Archive:
    copy = Archive(quality_task=archive.quality_task, bc_tasks=archive.bc_tasks, bins=archive.bins)
    copy.occupant[...] = archive.occupant
    copy.quality[...] = archive.quality
    copy.inserted[...] = archive.inserted
    return copy


def axis_pairs(n_axes: int) -> list[tuple[int, int]]:
    """The pairs of behaviour axes an archive is drawn over (one pair for K = 3)."""
    return list(itertools.combinations(range(n_axes), 2))


def project(values: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """The best (max, NaN-aware) of `values` over every axis not in `keep`; NaN where all are empty."""
    drop = tuple(a for a in range(values.ndim) if a not in keep)
    if not drop:
        return values.copy()
    filled = np.where(np.isnan(values), -np.inf, values).max(axis=drop)
    return np.where(np.isneginf(filled), np.nan, filled)


# text summary ---------------------------------------------------------------------------------

def summary(run: RunState, generation: int | None = None, *, lineage_depth: int | None = None) -> str:
    """The text report of `analyze`: archives, best model per task, the final test table, lineage."""
    generation = run.check_generation(generation)
    n_children = sum(1 for row in run.history if row.generation <= generation)
    status = ("in progress, analysed up to its last checkpoint" if run.in_progress else "finished")
    lines = [f"run {run.path} ({status}): phase {run.phase}, generation {generation} of "
             f"{run.generations} ({run.generations_done} done), tasks {', '.join(run.task_names)}, "
             f"{n_children} children evaluated"]
    if run.source != run.rundir.state_path:
        lines.append(f"note: state.h5 was unreadable; this is the previous checkpoint {run.source}")
    if not run.has_archives:
        lines.append(f"no archives yet (phase {run.phase}): the initial evaluations so far")
        for m, kind in enumerate(run.kinds):
            if kind in (ModelKind.BASE, ModelKind.EXPERT) and np.all(np.isfinite(run.scores[m])):
                lines.append(f"  {run.describe(m):<24} {run.format_scores(run.scores[m])}")
        return "\n".join(lines)

    archives = run.archives_at([generation])[generation]
    lines.append("")
    lines.append(f"Archives at generation {generation} (search split)")
    lines.append(f"{'archive':<12}{'coverage':>18}{'QD score':>10}  best model per task")
    elites = []
    for name, archive in zip(run.task_names, archives):
        elite = archive.elite()
        elites.append(elite)
        filled = int(np.count_nonzero(archive.occupant >= 0))
        coverage = f"{archive.coverage():.1%} ({filled}/{archive.occupant.size})"
        lines.append(f"{name:<12}{coverage:>18}{archive.qd_score():>10.3f}  {run.describe(elite)}: "
                     f"{run.format_scores(run.scores[elite])}")

    timings = run.timings(generation)
    if len(timings["generation"]) and np.any(np.isfinite(timings["total"])):
        means = " ".join(f"{key}={np.nanmean(timings[key]):.2f}s" for key in (*TIMING_PHASES, "total"))
        lines.append(f"mean time per generation: {means}")

    aggregate = [m for m, kind in enumerate(run.kinds) if kind == ModelKind.AGGREGATE]
    if generation == run.generations_done and aggregate and np.all(np.isfinite(run.test_scores[aggregate[-1]])):
        from cqd_mpi.run.report import build_report, format_report

        lines.append("")
        report = build_report(run.core)
        lines.append(format_report(report))
        if normalised.predicts_masks(run.config_text):
            lines.append("")
            lines.extend(normalised.section(run, report))
    elif generation == run.generations_done:
        lines.append("aggregate: not evaluated yet (the final phase has not run)")

    lines.append("")
    lines.append("Lineage of the elites (parents back to the experts)")
    shown: set[int] = set()
    for name, elite in zip(run.task_names, elites):
        lines.append(f"elite of {name}:")
        lines.extend(f"  {line}" for line in run.lineage_lines(elite, shown=shown, max_depth=lineage_depth))
    return "\n".join(lines)
