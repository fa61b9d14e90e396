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

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.qd.archive import Archive, Bins, sample_parents

PHASES = ("init", "search", "final", "done")
SPLITS = ("search", "test")
MODEL_KINDS = ("base", "expert", "child", "average", "aggregate")


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to build a model's weights.

    kind "dir": the HF dir at `path`. kind "crossover": parents, crossover weights,
    active task (for the expert mutation basis) and mutation seed. kind "aggregate":
    theta_base + sum_i betas[i] * tau(members[i]).
    """

    kind: str
    path: str = ""
    parents: tuple[int, int] = (-1, -1)
    weights: tuple[float, float] = (math.nan, math.nan)
    active_task: int = -1
    mutation_seed: int = -1
    members: tuple[int, ...] = ()
    betas: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Job:
    model_id: int
    generation: int
    phase: str
    split: str
    recipe: ModelRecipe


@dataclasses.dataclass
class ModelRecord:
    id: int
    kind: str
    generation: int
    n_tasks: dataclasses.InitVar[int]
    parent1: int = -1
    parent2: int = -1
    active_task: int = -1
    w1: float = math.nan
    w2: float = math.nan
    mutation_seed: int = -1
    saved: bool = False
    path: str = ""
    scores: np.ndarray = None
    test_scores: np.ndarray = None
    n_errors: int = 0
    test_errors: int = 0

    def __post_init__(self, n_tasks: int):
        if self.scores is None:
            self.scores = np.full(n_tasks, np.nan)
        if self.test_scores is None:
            self.test_scores = np.full(n_tasks, np.nan)


@dataclasses.dataclass
class HistoryRow:
    generation: int
    active_task: int
    child_id: int
    entered: np.ndarray
    eval_errors: int
    qd_score: np.ndarray
    coverage: np.ndarray
    merge_s: float = math.nan
    transfer_s: float = math.nan
    eval_s: float = math.nan
    total_s: float = math.nan


@dataclasses.dataclass(frozen=True)
class Told:
    """The outcome of a tell: archives entered, whether to save the model's weights, and
    models that left every archive (their saved weights can be deleted)."""

    job: Job
    entered: tuple[str, ...]
    save: bool
    dead: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Split:
    search: tuple[str, ...]
    test: tuple[str, ...]

    def ids(self, split: str) -> tuple[str, ...]:
        return self.search if split == "search" else self.test


def make_splits(item_ids: Mapping[str, Sequence[str]], *, seed: int, search_fraction: float = 0.5
                ) -> dict[str, Split]:
    """Split each task's items once, seeded, into search and test halves (order kept)."""
    splits = {}
    for name, ids in item_ids.items():
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {name!r} has duplicate item ids")
        if len(ids) < 2:
            raise ValueError(f"task {name!r} needs at least 2 items to split, got {len(ids)}")
        rng = seeding.numpy_rng(seed, 0, f"split:{name}")
        order = rng.permutation(len(ids))
        n_search = min(max(1, round(search_fraction * len(ids))), len(ids) - 1)
        search = sorted(order[:n_search])
        test = sorted(order[n_search:])
        splits[name] = Split(tuple(ids[i] for i in search), tuple(ids[i] for i in test))
    return splits


def softmax(values: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64) / temperature
    e = np.exp(x - x.max())
    return e / e.sum()


class CycleQD:
    """The CycleQD algorithm state and its ask/tell interface."""

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
        self._auto_bins = [b is None for b in self.bins]
        self.archives: list[Archive] = []
        self.models: list[ModelRecord] = []
        self.history: list[HistoryRow] = []
        self.item_scores: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
        self.pending: list[Job] = []
        self.phase = "init"
        self.generations_done = 0
        self.next_stamp = 0
        self._dispatched = 0

        self._add_model("base", 0, path=str(base_path), saved=True)
        for path in expert_paths:
            self._add_model("expert", 0, path=str(path), saved=True)
        for record in self.models:
            self.pending.append(Job(record.id, 0, "init", "search", ModelRecipe("dir", path=record.path)))

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
            record.saved = bool(entered)
            record.path = f"models/{record.id}" if entered else ""
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

    def _offer(self, record: ModelRecord) -> tuple[str, ...]:
        entered = []
        for name, archive in zip(self.task_names, self.archives):
            if archive.offer(record.id, record.scores, self.next_stamp).entered:
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
        rng = seeding.numpy_rng(self.seed, t, "crossover")
        while True:
            w1, w2 = rng.normal(self.crossover_mu, self.crossover_sigma, size=2)
            if abs(w1 + w2) >= 1e-6:
                break
        mutation_seed = seeding.derive_seed(self.seed, t, "mutation")
        record = self._add_model("child", t, parent1=p1, parent2=p2, active_task=active,
                                 w1=float(w1), w2=float(w2), mutation_seed=mutation_seed)
        recipe = ModelRecipe("crossover", parents=(p1, p2), weights=(float(w1), float(w2)),
                        active_task=active, mutation_seed=mutation_seed)
        return Job(record.id, t, "search", "search", recipe)

    def _start_final(self) -> None:
        self.phase = "final"
        t = self.generations_done
        jobs = [self.base_id, *self.expert_ids]
        k = self.k
        average = self._add_model("average", t)
        average_recipe = ModelRecipe("aggregate", members=tuple(self.expert_ids), betas=(1.0 / k,) * k)
        elites = self.elites()
        for e in elites:
            if e not in jobs:
                jobs.append(e)
        aggregate = self._add_model("aggregate", t, path="final")
        aggregate_recipe = ModelRecipe("aggregate", members=tuple(elites), betas=tuple(self.aggregate_betas()))
        self.pending.extend(Job(m, t, "final", "test", ModelRecipe("dir", path=self.models[m].path)) for m in jobs)
        self.pending.append(Job(average.id, t, "final", "test", average_recipe))
        self.pending.append(Job(aggregate.id, t, "final", "test", aggregate_recipe))

    # queries --------------------------------------------------------------------------------

    def elites(self) -> list[int]:
        """Archive k's elite (highest f_k; ties: most recently inserted), for every k."""
        return [archive.elite() for archive in self.archives]

    def aggregate_betas(self, temperature: float = 1.0) -> np.ndarray:
        """beta = softmax over k of archive k's elite's f_k."""
        return softmax([self.models[e].scores[k] for k, e in enumerate(self.elites())], temperature)

    def live_models(self) -> set[int]:
        """Models whose weights must stay on disk: archive members and pending jobs' inputs."""
        live = {int(m) for archive in self.archives for m in archive.members()}
        for job in self.pending:
            live.update(m for m in job.recipe.parents if m >= 0)
            live.update(job.recipe.members)
        return live

    def report(self) -> dict:
        """Test-split scores of the base, experts, naive average, elites and aggregate."""
        def number(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        def entry(m: int) -> dict:
            r = self.models[m]
            return {"id": m, "kind": r.kind, "path": r.path,
                    "test_scores": {n: number(s) for n, s in zip(self.task_names, r.test_scores)},
                    "mean": number(float(np.mean(r.test_scores))),
                    "search_scores": {n: number(s) for n, s in zip(self.task_names, r.scores)}}

        by_kind = {kind: [r.id for r in self.models if r.kind == kind] for kind in MODEL_KINDS}
        return {
            "tasks": list(self.task_names),
            "generations": self.generations_done,
            "base": entry(self.base_id),
            "experts": {n: entry(e) for n, e in zip(self.task_names, self.expert_ids)},
            "naive_average": entry(by_kind["average"][-1]) if by_kind["average"] else None,
            "elites": {n: entry(e) for n, e in zip(self.task_names, self.elites())} if self.archives else {},
            "aggregate": entry(by_kind["aggregate"][-1]) if by_kind["aggregate"] else None,
            "aggregate_betas": [float(b) for b in self.aggregate_betas()] if self.archives else [],
        }

    # snapshots ------------------------------------------------------------------------------
    # The tree below is state.h5 schema v1 (see README): dicts are groups, an "attrs" key holds
    # a group's attributes, numpy arrays and lists of str are datasets.

    def state_dict(self) -> dict:
        k = self.k
        models = self.models
        n = len(models)
        tree: dict = {
            "attrs": {
                "seed": self.seed, "task_names": list(self.task_names), "phase": self.phase,
                "generations": self.generations, "generations_done": self.generations_done,
                "next_stamp": self.next_stamp, "sampling": self.sampling,
                "alpha_low": self.alpha_low, "alpha_high": self.alpha_high,
                "crossover_mu": self.crossover_mu, "crossover_sigma": self.crossover_sigma,
                "pipeline_depth": self.pipeline_depth, "n_bins": self.n_bins,
                "bc_lower_factor": self.bc_lower_factor, "bc_upper_factor": self.bc_upper_factor,
                "rng": "numpy SeedSequence([seed, generation, crc32(purpose)])",
            },
            "tasks": {},
            "archives": {},
            "models": {
                "id": np.array([r.id for r in models], dtype=np.int64),
                "kind": [r.kind for r in models],
                "generation": np.array([r.generation for r in models], dtype=np.int64),
                "parent1": np.array([r.parent1 for r in models], dtype=np.int64),
                "parent2": np.array([r.parent2 for r in models], dtype=np.int64),
                "active_task": np.array([r.active_task for r in models], dtype=np.int64),
                "w1": np.array([r.w1 for r in models], dtype=np.float64),
                "w2": np.array([r.w2 for r in models], dtype=np.float64),
                "mutation_seed": np.array([r.mutation_seed for r in models], dtype=np.int64),
                "scores": np.array([r.scores for r in models], dtype=np.float64).reshape(n, k),
                "test_scores": np.array([r.test_scores for r in models], dtype=np.float64).reshape(n, k),
                "n_errors": np.array([r.n_errors for r in models], dtype=np.int64),
                "test_errors": np.array([r.test_errors for r in models], dtype=np.int64),
                "saved": np.array([r.saved for r in models], dtype=bool),
                "path": [r.path for r in models],
            },
            "history": _history_columns(self.history, k),
            "pending": _pending_columns(self.pending, k),
            "items": {},
        }
        for t, name in enumerate(self.task_names):
            bins = self.bins[t]
            tree["tasks"][name] = {
                "attrs": {"bc_lower": bins.lower if bins else math.nan,
                          "bc_upper": bins.upper if bins else math.nan,
                          "n_bins": bins.n_bins if bins else self.n_bins,
                          "auto_bins": self._auto_bins[t]},
                "search_ids": list(self.splits[name].search),
                "test_ids": list(self.splits[name].test),
            }
            group = {}
            for split in SPLITS:
                width = len(self.splits[name].ids(split))
                matrix = np.full((n, width), np.nan, dtype=np.float32)
                for m, per_task in self.item_scores[split].items():
                    matrix[m] = per_task[name]
                group[split] = matrix
            tree["items"][name] = group
        for name, archive in zip(self.task_names, self.archives):
            tree["archives"][name] = {
                "attrs": {"quality_task": name,
                          "bc_tasks": [self.task_names[t] for t in archive.bc_tasks]},
                "occupant": archive.occupant.copy(),
                "quality": archive.quality.copy(),
                "inserted": archive.inserted.copy(),
            }
        return tree

    @classmethod
    def from_state_dict(cls, tree: Mapping) -> CycleQD:
        """Rebuild a core from state_dict() output (in memory or read back from HDF5)."""
        attrs = tree["attrs"]
        names = [str(n) for n in attrs["task_names"]]
        splits = {n: Split(tuple(tree["tasks"][n]["search_ids"]), tuple(tree["tasks"][n]["test_ids"]))
                  for n in names}
        columns = tree["models"]
        kinds = [str(x) for x in columns["kind"]]
        core = cls.__new__(cls)
        core.task_names = tuple(names)
        core.splits = splits
        for key in ("generations", "seed", "generations_done", "next_stamp", "pipeline_depth", "n_bins"):
            setattr(core, key, int(attrs[key]))
        for key in ("alpha_low", "alpha_high", "crossover_mu", "crossover_sigma",
                    "bc_lower_factor", "bc_upper_factor"):
            setattr(core, key, float(attrs[key]))
        core.sampling = str(attrs["sampling"])
        core.phase = str(attrs["phase"])
        core.bins = []
        core._auto_bins = []
        for name in names:
            task_attrs = tree["tasks"][name]["attrs"]
            lower = float(task_attrs["bc_lower"])
            core._auto_bins.append(bool(task_attrs["auto_bins"]))
            core.bins.append(None if math.isnan(lower) else
                             Bins(lower, float(task_attrs["bc_upper"]), int(task_attrs["n_bins"])))
        core.models = []
        for i, kind in enumerate(kinds):
            core.models.append(ModelRecord(
                id=int(columns["id"][i]), kind=kind, generation=int(columns["generation"][i]),
                n_tasks=len(names), parent1=int(columns["parent1"][i]), parent2=int(columns["parent2"][i]),
                active_task=int(columns["active_task"][i]), w1=float(columns["w1"][i]),
                w2=float(columns["w2"][i]), mutation_seed=int(columns["mutation_seed"][i]),
                saved=bool(columns["saved"][i]), path=str(columns["path"][i]),
                scores=np.array(columns["scores"][i], dtype=np.float64),
                test_scores=np.array(columns["test_scores"][i], dtype=np.float64),
                n_errors=int(columns["n_errors"][i]), test_errors=int(columns["test_errors"][i])))
        core.archives = []
        for q, name in enumerate(names):
            if name not in tree["archives"]:
                continue
            bc = [t for t in range(len(names)) if t != q]
            archive = Archive(quality_task=q, bc_tasks=bc, bins=[core.bins[t] for t in bc])
            group = tree["archives"][name]
            archive.occupant[...] = group["occupant"]
            archive.quality[...] = group["quality"]
            archive.inserted[...] = group["inserted"]
            core.archives.append(archive)
        core.history = _history_rows(tree["history"])
        core.pending = _pending_jobs(tree["pending"])
        core.item_scores = {s: {} for s in SPLITS}
        for split in SPLITS:
            for m in range(len(core.models)):
                rows = {n: np.asarray(tree["items"][n][split][m], dtype=np.float32) for n in names}
                if not all(np.isnan(r).all() for r in rows.values()):
                    core.item_scores[split][m] = rows
        core._dispatched = 0
        return core


_HISTORY_FLOATS = ("merge_s", "transfer_s", "eval_s", "total_s")


def _history_columns(rows: Sequence[HistoryRow], k: int) -> dict:
    return {
        "generation": np.array([r.generation for r in rows], dtype=np.int64),
        "active_task": np.array([r.active_task for r in rows], dtype=np.int64),
        "child_id": np.array([r.child_id for r in rows], dtype=np.int64),
        "entered": np.array([r.entered for r in rows], dtype=bool).reshape(len(rows), k),
        "eval_errors": np.array([r.eval_errors for r in rows], dtype=np.int64),
        "qd_score": np.array([r.qd_score for r in rows], dtype=np.float64).reshape(len(rows), k),
        "coverage": np.array([r.coverage for r in rows], dtype=np.float64).reshape(len(rows), k),
        **{key: np.array([getattr(r, key) for r in rows], dtype=np.float64) for key in _HISTORY_FLOATS},
    }


def _history_rows(columns: Mapping) -> list[HistoryRow]:
    return [
        HistoryRow(generation=int(columns["generation"][i]), active_task=int(columns["active_task"][i]),
                   child_id=int(columns["child_id"][i]), entered=np.array(columns["entered"][i], dtype=bool),
                   eval_errors=int(columns["eval_errors"][i]),
                   qd_score=np.array(columns["qd_score"][i], dtype=np.float64),
                   coverage=np.array(columns["coverage"][i], dtype=np.float64),
                   **{key: float(columns[key][i]) for key in _HISTORY_FLOATS})
        for i in range(len(columns["generation"]))
    ]


def _pending_columns(jobs: Sequence[Job], k: int) -> dict:
    members = np.full((len(jobs), k), -1, dtype=np.int64)
    betas = np.full((len(jobs), k), np.nan, dtype=np.float64)
    for i, job in enumerate(jobs):
        members[i, : len(job.recipe.members)] = job.recipe.members
        betas[i, : len(job.recipe.betas)] = job.recipe.betas
    return {
        "model_id": np.array([j.model_id for j in jobs], dtype=np.int64),
        "generation": np.array([j.generation for j in jobs], dtype=np.int64),
        "phase": [j.phase for j in jobs],
        "split": [j.split for j in jobs],
        "recipe": [j.recipe.kind for j in jobs],
        "path": [j.recipe.path for j in jobs],
        "parent1": np.array([j.recipe.parents[0] for j in jobs], dtype=np.int64),
        "parent2": np.array([j.recipe.parents[1] for j in jobs], dtype=np.int64),
        "w1": np.array([j.recipe.weights[0] for j in jobs], dtype=np.float64),
        "w2": np.array([j.recipe.weights[1] for j in jobs], dtype=np.float64),
        "active_task": np.array([j.recipe.active_task for j in jobs], dtype=np.int64),
        "mutation_seed": np.array([j.recipe.mutation_seed for j in jobs], dtype=np.int64),
        "members": members,
        "betas": betas,
    }


def _pending_jobs(columns: Mapping) -> list[Job]:
    jobs = []
    for i in range(len(columns["model_id"])):
        members = tuple(int(m) for m in columns["members"][i] if m >= 0)
        recipe = ModelRecipe(
            str(columns["recipe"][i]), path=str(columns["path"][i]),
            parents=(int(columns["parent1"][i]), int(columns["parent2"][i])),
            weights=(float(columns["w1"][i]), float(columns["w2"][i])),
            active_task=int(columns["active_task"][i]), mutation_seed=int(columns["mutation_seed"][i]),
            members=members, betas=tuple(float(b) for b in columns["betas"][i][: len(members)]))
        jobs.append(Job(int(columns["model_id"][i]), int(columns["generation"][i]), str(columns["phase"][i]),
                        str(columns["split"][i]), recipe))
    return jobs
