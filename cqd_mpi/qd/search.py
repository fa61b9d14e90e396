"""The search loop every method shares, as an ask/tell core that knows nothing about processes,
files or models' weights (pyribs' Scheduler: the loop composed with what differs).

A runtime asks for jobs (a model to build from a recipe, and the split to score it on),
evaluates them however it likes, and tells the per-task metrics back in the order the jobs
were issued. Three phases:

- init: the base and the experts are scored on the search split; auto bins are set from
  the experts; every expert is offered to every archive.
- search: the strategy (qd/strategy.py) proposes candidates, each scored model is offered to
  the archives the strategy names, and a history row records each generation.
- final: the base, the experts, the naive task-vector average, the archive elites and the
  method's final model (kind aggregate) are scored on the test split.

With `test_every` N > 0, every N models evaluated in the search (before the budget) the
would-be final model (a model of kind curve, built as the final model would be then) is
scored on the test split, queued behind the jobs already issued; the strategies count search
jobs only, so these points change no candidate, only the models' ids.

All randomness of generation t comes from cqd_mpi.seeding keyed by (seed, t, purpose), so
a search restored from a snapshot continues exactly as the original would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from cqd_mpi.qd.archive import Archive, Bins
from cqd_mpi.qd.params import SearchParams
from cqd_mpi.qd.records import (
    SPLITS,
    HistoryRow,
    Job,
    ModelKind,
    ModelRecipe,
    ModelRecord,
    Phase,
    RecipeKind,
    Split,
    Told,
)
from cqd_mpi.qd.sampling import softmax

STORED = ModelRecipe(RecipeKind.STORED)


@dataclasses.dataclass
class Progress:
    """Where a search stands: what a checkpoint stores beyond the parameters (run/state.py)."""

    models: list[ModelRecord]
    archives: list[Archive]
    history: list[HistoryRow]
    pending: list[Job]
    item_scores: dict[str, dict[int, dict[str, np.ndarray]]]
    phase: Phase
    generations_done: int
    next_stamp: int
    dropped: list[tuple[int, int]]
    auto_bins: list[bool]


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """A method with no settings of its own."""


class Strategy:
    """The part of a search method that is its own (the base class proposes nothing)."""

    method = ""
    """The name `qd.method` gives it (qd/methods.py)."""
    label = ""
    final_label = ""
    Settings: type = NoSettings
    min_tasks = 2
    """The fewest tasks the method makes sense with (one leaves nothing to cycle or trade off;
    run/config.py refuses fewer, naming the methods that fit: qd/methods.py)."""

    def __init__(self, settings: Any = None):
        self.settings = self.Settings() if settings is None else settings
        if not isinstance(self.settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(settings).__name__}")

    @classmethod
    def settings_from(cls, qd: Any) -> Any:
        """The method's settings from the config's `qd` section (run/config.QDConfig)."""
        return cls.Settings()

    def propose(self, search: Search) -> list[Job] | None:
        """The search-phase jobs to add now (none while the method waits for scores), or None
        when the search is over. Called after the init phase and after every search tell."""
        return None

    def offered_to(self, search: Search, record: ModelRecord) -> Collection[int]:
        """The archives (task indices) a scored model is offered to."""
        return range(search.k)

    def recipe(self, search: Search, record: ModelRecord) -> ModelRecipe | None:
        """How to build a model of a kind the method adds (None: the loop's own recipe)."""
        return None

    def finalize(self, search: Search, final: ModelRecord) -> None:
        """Fix the method's final model (kind aggregate) before its recipe is taken; the
        default is the aggregate of the archives' elites."""


class Search:
    """A search method's state and its ask/tell interface: the loop, with a `Strategy`.

    New (`base_path`, `expert_paths`) or restored (`progress`, from a checkpoint): both go
    through the same checks."""

    def __init__(self, *, params: SearchParams, strategy: Strategy, task_names: Sequence[str],
                 splits: Mapping[str, Split], bins: Sequence[Bins | None] | None = None,
                 base_path: str | None = None, expert_paths: Sequence[str] | None = None,
                 progress: Progress | None = None):
        if not isinstance(params, SearchParams):
            raise TypeError(f"params must be SearchParams, got {type(params).__name__}")
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
        self.params = params
        self.strategy = strategy
        self.task_names = tuple(task_names)
        k = len(self.task_names)
        missing = [n for n in self.task_names if n not in splits]
        if missing:
            raise ValueError(f"no item split for tasks {missing}")
        self.splits = {n: splits[n] for n in self.task_names}
        self.bins: list[Bins | None] = list(bins) if bins is not None else [None] * k
        if len(self.bins) != k:
            raise ValueError(f"expected {k} bins (None for auto), got {len(self.bins)}")
        self._dispatched = 0
        if progress is None:
            if base_path is None or expert_paths is None or len(expert_paths) != k:
                raise ValueError(f"expected a base and one expert per task ({k}), got "
                                 f"{0 if expert_paths is None else len(expert_paths)} experts")
            models = [ModelRecord(id=i, kind=ModelKind.BASE if i == 0 else ModelKind.EXPERT, generation=0,
                                  n_tasks=k, source=str(path)) for i, path in enumerate([base_path, *expert_paths])]
            progress = Progress(models=models, archives=[], history=[],
                                pending=[Job(r.id, 0, Phase.INIT, "search", STORED) for r in models],
                                item_scores={s: {} for s in SPLITS}, phase=Phase.INIT, generations_done=0,
                                next_stamp=0, dropped=[], auto_bins=[b is None for b in self.bins])
        self._adopt(progress)

    def _adopt(self, progress: Progress) -> None:
        """Take `progress` as this search's state, after checking that it fits the parameters."""
        k = self.k
        kinds = [r.kind for r in progress.models[: k + 1]]
        if kinds != [ModelKind.BASE] + [ModelKind.EXPERT] * k:
            raise ValueError(f"expected the base and {k} experts as the first models, got {[str(x) for x in kinds]}")
        if progress.archives and len(progress.archives) != k:
            raise ValueError(f"expected {k} archives (or none before the search), got {len(progress.archives)}")
        if len(progress.auto_bins) != k:
            raise ValueError(f"expected {k} auto_bins flags, got {len(progress.auto_bins)}")
        unknown = [j.model_id for j in progress.pending if not 0 <= j.model_id < len(progress.models)]
        if unknown:
            raise ValueError(f"pending jobs name models {unknown} that the run does not have")
        for field in dataclasses.fields(Progress):
            setattr(self, field.name, getattr(progress, field.name))
        self.phase = Phase(self.phase)

    # what the method is --------------------------------------------------------------------

    method = property(lambda self: self.strategy.method)
    label = property(lambda self: self.strategy.label)
    final_label = property(lambda self: self.strategy.final_label)
    generations = property(lambda self: self.params.generations)
    seed = property(lambda self: self.params.seed)

    @property
    def k(self) -> int:
        return len(self.task_names)

    @property
    def base_id(self) -> int:
        return 0

    @property
    def expert_ids(self) -> list[int]:
        return list(range(1, self.k + 1))

    @property
    def done(self) -> bool:
        return self.phase == Phase.DONE

    def add_model(self, kind: ModelKind, generation: int, **fields) -> ModelRecord:
        record = ModelRecord(id=len(self.models), kind=kind, generation=generation, n_tasks=self.k, **fields)
        self.models.append(record)
        return record

    def active_task(self, generation: int) -> int:
        return generation % self.k

    # ask / tell -----------------------------------------------------------------------------

    def ask(self) -> Job | None:
        """The next job to dispatch, or None until an earlier job has been told."""
        if self._dispatched < len(self.pending):
            job = self.pending[self._dispatched]
            self._dispatched += 1
            return job
        return None

    def redispatch(self) -> None:
        """Forget which pending jobs were handed out (after a restore or a lost worker group)."""
        self._dispatched = 0

    def tell(self, model_id: int, scores: Sequence[float], *,
             item_scores: Mapping[str, Sequence[float]] | None = None, n_errors: int = 0,
             timings: Mapping[str, float] | None = None) -> Told:
        """Record the metrics (one per task, config order) of the oldest pending job, and for a
        search job its generation's history row with `timings` (seconds by phase: merge,
        transfer, eval, total)."""
        if not self.pending or self.pending[0].model_id != model_id:
            expected = self.pending[0].model_id if self.pending else None
            raise ValueError(f"tell() must follow the order of ask(): expected model {expected}, got {model_id}")
        if self._dispatched == 0:
            raise ValueError(f"model {model_id} was told before it was asked")
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (self.k,) or not np.all(np.isfinite(scores)):
            raise ValueError(f"expected {self.k} finite metrics, got {scores!r}")
        job = self.pending.pop(0)
        self._dispatched -= 1
        record = self.models[model_id]
        if job.split == "search":
            record.scores = scores
            record.n_errors = int(n_errors)
        else:
            record.test_scores = scores
            record.test_errors = int(n_errors)
        if item_scores is not None:
            self.item_scores[job.split][model_id] = {
                name: np.asarray(item_scores[name], dtype=np.float32) for name in self.task_names
            }
        live_before = self.live_models()
        entered: tuple[str, ...] = ()
        if job.phase == Phase.INIT:
            if not self.pending:
                self._start_search()
        elif job.phase == Phase.SEARCH:
            entered = self._offer(record)
            self.generations_done = job.generation
            self.history.append(HistoryRow(
                generation=job.generation, active_task=job.recipe.active_task, child_id=model_id,
                entered=np.array([n in entered for n in self.task_names]), eval_errors=int(n_errors),
                qd_score=np.array([a.qd_score() for a in self.archives]),
                coverage=np.array([a.coverage() for a in self.archives]),
                **{f"{key}_s": float(value) for key, value in (timings or {}).items()},
            ))
            self._curve_point(job.generation)
            self._refill()
        elif job.phase == Phase.FINAL and not self.pending:
            self.phase = Phase.DONE
        dead = tuple(sorted(m for m in live_before - self.live_models()
                            if self.models[m].kind == ModelKind.CHILD))
        return Told(job=job, entered=entered, dead=dead)

    # phases ---------------------------------------------------------------------------------

    def _start_search(self) -> None:
        experts = self.expert_ids
        p = self.params
        for t, bins in enumerate(self.bins):
            if bins is None:
                self.bins[t] = Bins.from_experts(
                    [self.models[e].scores[t] for e in experts], n_bins=p.n_bins,
                    lower_factor=p.bc_lower_factor, upper_factor=p.bc_upper_factor)
        self.archives = [
            Archive(quality_task=q, bc_tasks=[t for t in range(self.k) if t != q],
                    bins=[self.bins[t] for t in range(self.k) if t != q])
            for q in range(self.k)
        ]
        for e in experts:
            self._offer(self.models[e])
        self.phase = Phase.SEARCH
        self._refill()

    def offered_to(self, record: ModelRecord):
        """The archives a scored model is offered to (the strategy's choice)."""
        return self.strategy.offered_to(self, record)

    def _offer(self, record: ModelRecord) -> tuple[str, ...]:
        entered = []
        targets = self.offered_to(record)
        for q, (name, archive) in enumerate(zip(self.task_names, self.archives)):
            if q in targets and archive.offer(record.id, record.scores, self.next_stamp).entered:
                entered.append(name)
                self.next_stamp += 1
        return tuple(entered)

    def _refill(self) -> None:
        jobs = self.strategy.propose(self)
        if jobs is None:
            self._start_final()
            return
        self.pending.extend(jobs)
        if not any(job.phase == Phase.SEARCH for job in self.pending):
            self._start_final()

    def _curve_point(self, generation: int) -> None:
        """After `generation` models evaluated, queue the would-be final model on the test
        split when the budget curve takes a point there (every `test_every`, before the budget:
        the final model is the point at the budget)."""
        every = self.params.test_every
        if not every or generation % every or generation >= self.generations:
            return
        record = self.add_model(ModelKind.CURVE, generation)
        self.strategy.finalize(self, record)
        recipe = self.strategy.recipe(self, record) or self._elites_aggregate()
        self.pending.append(Job(record.id, generation, Phase.CURVE, "test", recipe))

    def _start_final(self) -> None:
        self.phase = Phase.FINAL
        t = self.generations_done
        ids = [self.base_id, *self.expert_ids]
        average = self.add_model(ModelKind.AVERAGE, t)
        for e in self.elites():
            if e not in ids:
                ids.append(e)
        final = self.add_model(ModelKind.AGGREGATE, t)
        self.strategy.finalize(self, final)
        self.pending.extend(Job(m, t, Phase.FINAL, "test", self.strategy.recipe(self, self.models[m]) or STORED)
                            for m in ids)
        self.pending.append(Job(average.id, t, Phase.FINAL, "test", self.recipe(average.id)))
        self.pending.append(Job(final.id, t, Phase.FINAL, "test", self.recipe(final.id)))

    def replay(self) -> Iterator[tuple[int, list[Archive], np.ndarray | None]]:
        """(generation, archives, entered) after the experts (generation 0, entered None) and
        after each history row's model, rebuilt from the stored scores by offering every model
        again in the order the run did; the same archive objects are updated in place."""
        archives = [Archive(quality_task=a.quality_task, bc_tasks=a.bc_tasks, bins=a.bins) for a in self.archives]
        stamp = 0

        def offer(record: ModelRecord) -> np.ndarray:
            nonlocal stamp
            entered = np.zeros(self.k, dtype=bool)
            targets = self.offered_to(record)
            for q, archive in enumerate(archives):
                if q in targets and archive.offer(record.id, record.scores, stamp).entered:
                    entered[q] = True
                    stamp += 1
            return entered

        def drop(generation: int) -> None:
            gone = [m for g, m in self.dropped if g == generation]
            for archive in archives:
                archive.occupant[np.isin(archive.occupant, gone)] = -1
                archive.quality[archive.occupant < 0] = np.nan
                archive.inserted[archive.occupant < 0] = -1

        for e in self.expert_ids:
            offer(self.models[e])
        drop(0)
        yield 0, archives, None
        for row in self.history:
            entered = offer(self.models[row.child_id])
            drop(row.generation)
            yield row.generation, archives, entered

    # queries --------------------------------------------------------------------------------

    def elites(self) -> list[int]:
        """Archive k's elite (highest f_k; ties: most recently inserted), for every k."""
        return [archive.elite() for archive in self.archives]

    def aggregate_betas(self, temperature: float = 1.0) -> list[float]:
        """beta = softmax over k of archive k's elite's f_k / T."""
        return softmax([self.models[e].scores[k] for k, e in enumerate(self.elites())], temperature)

    def recipe(self, model_id: int) -> ModelRecipe:
        """How the model's weights are built: the strategy's recipe for the kinds it makes, else
        a child from its parents, crossover weights and mutation seed; the naive average and
        the aggregate from their members; the base and the experts as stored."""
        record = self.models[model_id]
        own = self.strategy.recipe(self, record)
        if own is not None:
            return own
        if record.kind == ModelKind.CHILD:
            return ModelRecipe(RecipeKind.CROSSOVER, parents=(record.parent1, record.parent2),
                               weights=(record.w1, record.w2), active_task=record.active_task,
                               mutation_seed=record.mutation_seed)
        if record.kind == ModelKind.AVERAGE:
            return ModelRecipe(RecipeKind.AGGREGATE, members=tuple(self.expert_ids), betas=(1.0 / self.k,) * self.k)
        if record.kind == ModelKind.AGGREGATE:
            return self._elites_aggregate()
        if record.kind == ModelKind.CURVE:
            job = next((j for j in self.pending if j.model_id == model_id), None)
            if job is None:
                raise ValueError(f"model {model_id} is a budget-curve point (runtime.test_every); its recipe is "
                                 "the aggregate of the elites when it was queued, which the state does not keep")
            return job.recipe
        return STORED

    def _elites_aggregate(self) -> ModelRecipe:
        return ModelRecipe(RecipeKind.AGGREGATE, members=tuple(self.elites()), betas=tuple(self.aggregate_betas()))

    def drop(self, model_ids: Sequence[int]) -> None:
        """Take models whose weights are lost out of the archives (recorded in `dropped` as
        (generations_done, id), so `replay` repeats it) and plan the pending jobs that read them
        again: the candidates from the first such one on are proposed anew, or the final phase
        starts over."""
        ids = {int(m) for m in model_ids}
        for archive in self.archives:
            gone = np.isin(archive.occupant, sorted(ids))
            if gone.any() and gone.sum() == np.count_nonzero(archive.occupant >= 0):
                raise ValueError(f"dropping models {sorted(ids)} would leave archive "
                                 f"{self.task_names[archive.quality_task]!r} empty")
            archive.occupant[gone], archive.quality[gone], archive.inserted[gone] = -1, np.nan, -1
        for m in sorted(ids):
            self.dropped.append((self.generations_done, m))
        hit = [i for i, job in enumerate(self.pending)
               if ids & ({job.model_id} | set(job.recipe.parents) | set(job.recipe.members))]
        if not hit:
            return
        self._dispatched = 0
        if self.phase == Phase.SEARCH:
            first = self.pending[hit[0]].model_id
            del self.pending[hit[0]:]
            del self.models[first:]
            self._refill()
        elif self.phase == Phase.FINAL:
            first = min(job.model_id for job in self.pending
                        if self.models[job.model_id].kind in (ModelKind.AVERAGE, ModelKind.AGGREGATE))
            self.pending = []
            del self.models[first:]
            self._start_final()

    def live_models(self) -> set[int]:
        """Models whose weights the run must keep: archive members and pending jobs' inputs."""
        live = {int(m) for archive in self.archives for m in archive.members()}
        for job in self.pending:
            live.update(m for m in job.recipe.parents if m >= 0)
            live.update(job.recipe.members)
        return live
