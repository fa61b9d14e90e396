"""CycleQD as an ask/tell loop that knows nothing about processes, files or models' weights.

A runtime asks for jobs (a model to build from a recipe, and the split to score it on),
evaluates them however it likes, and tells the per-task metrics back in the order the jobs
were issued. Three phases:

- init: the base and the experts are scored on the search split; auto bins are set from
  the experts; every expert is offered to every archive.
- search: generation t = 1..N, active archive i = t mod K: two parents sampled from
  archive i, crossover weights drawn, a mutation seed drawn; the child is offered to all
  archives. With pipeline_depth d, child t is sampled right after generation t-1-d is told
  (so up to d+1 children are in flight), whatever the runtime's timing.
- final: the base, the experts, the naive task-vector average, the archive elites and the
  aggregate are scored on the test split.

All randomness of generation t comes from cqd_mpi.seeding keyed by (seed, t, purpose), so
a core restored from a snapshot continues exactly as the original would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.qd.archive import Archive, Bins
from cqd_mpi.qd.records import (
    SPLITS,
    HistoryRow,
    Job,
    ModelRecipe,
    ModelRecord,
    Split,
    Told,
)
from cqd_mpi.qd.sampling import sample_crossover_weights, sample_parents, softmax

STORED = ModelRecipe("stored")


class CycleQD:
    """The CycleQD algorithm state and its ask/tell interface.

    It is also the interface every search method shares (qd/methods.py): the runtime, the
    state file and the analysis see only this class's attributes and methods. A method
    changes the search phase (`_refill`, `offered_to`, `recipe`); `settings()` are its own
    root attributes of the state and `restore(attrs)` reads them back.
    """

    method = "cycleqd"
    label = "CycleQD"
    final_label = "CycleQD aggregate"
    min_tasks = 2
    """Fewer tasks leave no behaviour axis: nothing to cycle or trade off (the config refuses them)."""

    def __init__(self, *, task_names: Sequence[str], base_path: str, expert_paths: Sequence[str],
                 splits: Mapping[str, Split], generations: int, seed: int,
                 bins: Sequence[Bins | None] | None = None, n_bins: int = 15,
                 bc_lower_factor: float = 0.85, bc_upper_factor: float = 1.15,
                 sampling: str = "elite", alpha_low: float = 0.5, alpha_high: float = 0.8,
                 crossover_mu: float = 1.0, crossover_sigma: float = 0.03,
                 pipeline_depth: int = 0):
        self.task_names = tuple(task_names)
        k = len(self.task_names)
        if len(expert_paths) != k:
            raise ValueError(f"expected one expert per task ({k}), got {len(expert_paths)}")
        missing = [n for n in self.task_names if n not in splits]
        if missing:
            raise ValueError(f"no item split for tasks {missing}")
        if sampling not in ("elite", "random"):
            raise ValueError(f"sampling must be 'elite' or 'random', got {sampling!r}")
        self.splits = {n: splits[n] for n in self.task_names}
        self.generations = int(generations)
        self.seed = int(seed)
        self.n_bins = int(n_bins)
        self.bc_lower_factor = float(bc_lower_factor)
        self.bc_upper_factor = float(bc_upper_factor)
        self.sampling = sampling
        self.alpha_low = float(alpha_low)
        self.alpha_high = float(alpha_high)
        self.crossover_mu = float(crossover_mu)
        self.crossover_sigma = float(crossover_sigma)
        self.pipeline_depth = int(pipeline_depth)
        self.bins: list[Bins | None] = list(bins) if bins is not None else [None] * k
        if len(self.bins) != k:
            raise ValueError(f"expected {k} bins (None for auto), got {len(self.bins)}")
        self.auto_bins = [b is None for b in self.bins]
        self.archives: list[Archive] = []
        self.models: list[ModelRecord] = []
        self.history: list[HistoryRow] = []
        self.item_scores: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
        self.pending: list[Job] = []
        self.phase = "init"
        self.generations_done = 0
        self.next_stamp = 0
        self.dropped: list[tuple[int, int]] = []
        self._dispatched = 0

        self._add_model("base", 0, source=str(base_path), saved=True)
        for path in expert_paths:
            self._add_model("expert", 0, source=str(path), saved=True)
        for record in self.models:
            self.pending.append(Job(record.id, 0, "init", "search", STORED))

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
        return self.phase == "done"

    def _add_model(self, kind: str, generation: int, **fields) -> ModelRecord:
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
        """Record the metrics (one per task, config order) of the oldest pending job."""
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
        if job.phase == "init":
            if not self.pending:
                self._start_search()
        elif job.phase == "search":
            entered = self._offer(record)
            record.saved = record.archived = bool(entered)
            self.generations_done = job.generation
            self.history.append(HistoryRow(
                generation=job.generation, active_task=job.recipe.active_task, child_id=model_id,
                entered=np.array([n in entered for n in self.task_names]), eval_errors=int(n_errors),
                qd_score=np.array([a.qd_score() for a in self.archives]),
                coverage=np.array([a.coverage() for a in self.archives]),
                **{f"{key}_s": float(value) for key, value in (timings or {}).items()},
            ))
            self._refill()
        elif job.phase == "final":
            record.saved = record.saved or record.kind == "aggregate"
            if not self.pending:
                self.phase = "done"
        dead = tuple(sorted(m for m in live_before - self.live_models()
                            if self.models[m].kind == "child"))
        for m in dead:
            self.models[m].saved = False
        return Told(job=job, entered=entered, save=bool(entered), dead=dead)

    def record_timings(self, generation: int, timings: Mapping[str, float]) -> None:
        """Fill in the timings of a generation's history row after the fact."""
        for row in self.history:
            if row.generation == generation:
                for key, value in timings.items():
                    setattr(row, f"{key}_s", float(value))

    # phases ---------------------------------------------------------------------------------

    def _start_search(self) -> None:
        experts = self.expert_ids
        for t, bins in enumerate(self.bins):
            if bins is None:
                self.bins[t] = Bins.from_experts(
                    [self.models[e].scores[t] for e in experts], n_bins=self.n_bins,
                    lower_factor=self.bc_lower_factor, upper_factor=self.bc_upper_factor)
        self.archives = [
            Archive(quality_task=q, bc_tasks=[t for t in range(self.k) if t != q],
                    bins=[self.bins[t] for t in range(self.k) if t != q])
            for q in range(self.k)
        ]
        for e in experts:
            self._offer(self.models[e])
        self.phase = "search"
        self._refill()

    def offered_to(self, record: ModelRecord) -> range | tuple[int, ...]:
        """The archives a scored model is offered to: all of them in CycleQD."""
        return range(self.k)

    def _offer(self, record: ModelRecord) -> tuple[str, ...]:
        entered = []
        targets = self.offered_to(record)
        for q, (name, archive) in enumerate(zip(self.task_names, self.archives)):
            if q in targets and archive.offer(record.id, record.scores, self.next_stamp).entered:
                entered.append(name)
                self.next_stamp += 1
        return tuple(entered)

    def _refill(self) -> None:
        in_flight = sum(1 for job in self.pending if job.phase == "search")
        while in_flight <= self.pipeline_depth:
            t = self.generations_done + in_flight + 1
            if t > self.generations:
                break
            self.pending.append(self._make_child(t))
            in_flight += 1
        if not self.pending:
            self._start_final()

    def _make_child(self, t: int) -> Job:
        active = self.active_task(t)
        archive = self.archives[active]
        members = archive.members()
        scores = np.stack([self.models[m].scores for m in members])
        p1, p2 = sample_parents(seeding.numpy_rng(self.seed, t, "sampling"), members, scores,
                                method=self.sampling, alpha_low=self.alpha_low, alpha_high=self.alpha_high)
        w1, w2 = sample_crossover_weights(seeding.numpy_rng(self.seed, t, "crossover"),
                                          self.crossover_mu, self.crossover_sigma)
        mutation_seed = seeding.derive_seed(self.seed, t, "mutation")
        record = self._add_model("child", t, parent1=p1, parent2=p2, active_task=active,
                                 w1=w1, w2=w2, mutation_seed=mutation_seed)
        return Job(record.id, t, "search", "search", self.recipe(record.id))

    def _start_final(self) -> None:
        self.phase = "final"
        t = self.generations_done
        jobs = [self.base_id, *self.expert_ids]
        average = self._add_model("average", t)
        for e in self.elites():
            if e not in jobs:
                jobs.append(e)
        aggregate = self._add_model("aggregate", t)
        self.pending.extend(Job(m, t, "final", "test", STORED) for m in jobs)
        self.pending.append(Job(average.id, t, "final", "test", self.recipe(average.id)))
        self.pending.append(Job(aggregate.id, t, "final", "test", self.recipe(aggregate.id)))

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

    # the state's view -----------------------------------------------------------------------

    @classmethod
    def options(cls, qd) -> dict:
        """The method's own constructor arguments from the config's `qd` section (none here)."""
        return {}

    def settings(self) -> dict:
        """The method's own settings, stored as root attributes of the state (none here)."""
        return {}

    def restore(self, attrs: Mapping) -> None:
        """Read back what `settings()` stored, after run/state.py rebuilt the shared fields."""

    # queries --------------------------------------------------------------------------------

    def elites(self) -> list[int]:
        """Archive k's elite (highest f_k; ties: most recently inserted), for every k."""
        return [archive.elite() for archive in self.archives]

    def aggregate_betas(self, temperature: float = 1.0) -> list[float]:
        """beta = softmax over k of archive k's elite's f_k / T."""
        return softmax([self.models[e].scores[k] for k, e in enumerate(self.elites())], temperature)

    def recipe(self, model_id: int) -> ModelRecipe:
        """How the model's weights are built: a child from its parents, crossover weights and
        mutation seed; the naive average and the aggregate from their members; the base and
        the experts as stored."""
        record = self.models[model_id]
        if record.kind == "child":
            return ModelRecipe("crossover", parents=(record.parent1, record.parent2),
                               weights=(record.w1, record.w2), active_task=record.active_task,
                               mutation_seed=record.mutation_seed)
        if record.kind == "average":
            return ModelRecipe("aggregate", members=tuple(self.expert_ids), betas=(1.0 / self.k,) * self.k)
        if record.kind == "aggregate":
            return ModelRecipe("aggregate", members=tuple(self.elites()), betas=tuple(self.aggregate_betas()))
        return STORED

    def drop(self, model_ids: Sequence[int]) -> None:
        """Take models whose weights are lost out of the archives (recorded in `dropped` as
        (generations_done, id), so `replay` repeats it) and plan the pending jobs that read them
        again: the children from the first such one on are sampled anew, or the final phase
        starts over."""
        ids = {int(m) for m in model_ids}
        for archive in self.archives:
            gone = np.isin(archive.occupant, sorted(ids))
            if gone.any() and gone.sum() == np.count_nonzero(archive.occupant >= 0):
                raise ValueError(f"dropping models {sorted(ids)} would leave archive "
                                 f"{self.task_names[archive.quality_task]!r} empty")
            archive.occupant[gone], archive.quality[gone], archive.inserted[gone] = -1, np.nan, -1
        for m in sorted(ids):
            self.models[m].saved = False
            self.dropped.append((self.generations_done, m))
        hit = [i for i, job in enumerate(self.pending)
               if ids & ({job.model_id} | set(job.recipe.parents) | set(job.recipe.members))]
        if not hit:
            return
        self._dispatched = 0
        if self.phase == "search":
            first = self.pending[hit[0]].model_id
            del self.pending[hit[0]:]
            del self.models[first:]
            self._refill()
        elif self.phase == "final":
            first = min(job.model_id for job in self.pending if self.models[job.model_id].kind in ("average", "aggregate"))
            self.pending = []
            del self.models[first:]
            self._start_final()

    def live_models(self) -> set[int]:
        """Models whose weights must stay on disk: archive members and pending jobs' inputs."""
        live = {int(m) for archive in self.archives for m in archive.members()}
        for job in self.pending:
            live.update(m for m in job.recipe.parents if m >= 0)
            live.update(job.recipe.members)
        return live
