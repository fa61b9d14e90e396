"""The records of a CycleQD run: models, jobs and their recipes, history rows, item splits.

Plain data that the core creates and tells about, that state files store, and that the
analysis reads back; none of it names a file of the run directory.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np

from cqd_mpi import seeding


class Name(str, enum.Enum):
    """A name the state stores as its plain string: equal to it, printed and formatted as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ModelKind(Name):
    BASE = "base"
    EXPERT = "expert"
    CHILD = "child"
    AVERAGE = "average"
    AGGREGATE = "aggregate"
    """The method's final model."""
    COMBINATION = "combination"
    """theta_base + sum_k c_k tau_k over the experts, with its own `coefficients` (a candidate
    of the coefficient searches, CMA-ES, NSGA-II and policy gradient)."""
    CURVE = "curve"
    """The would-be final model after `generation` models evaluated (`runtime.test_every`),
    scored on the test split only and not counted in the budget (a point of the budget curve)."""


class Phase(Name):
    INIT = "init"
    SEARCH = "search"
    FINAL = "final"
    DONE = "done"
    CURVE = "curve"
    """A job's phase only: a budget-curve point scored during the search (the search's own
    phase stays search)."""


class RecipeKind(Name):
    STORED = "stored"
    CROSSOVER = "crossover"
    AGGREGATE = "aggregate"


PHASES = tuple(p.value for p in Phase)
SPLITS = ("search", "test")
MODEL_KINDS = tuple(k.value for k in ModelKind)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to build a model's weights.

    kind "stored": the weights the run keeps for the job's model (the base and experts
    where the user keeps them, archive members in the run directory). kind "crossover":
    parents, crossover weights, active task (for the expert mutation basis) and mutation
    seed. kind "aggregate": theta_base + sum_i betas[i] * tau(members[i]).
    """

    kind: RecipeKind
    parents: tuple[int, int] = (-1, -1)
    weights: tuple[float, float] = (math.nan, math.nan)
    active_task: int = -1
    mutation_seed: int = -1
    members: tuple[int, ...] = ()
    betas: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kind", RecipeKind(self.kind))


@dataclasses.dataclass(frozen=True)
class Job:
    model_id: int
    generation: int
    phase: Phase
    split: str
    recipe: ModelRecipe

    def __post_init__(self):
        object.__setattr__(self, "phase", Phase(self.phase))


@dataclasses.dataclass
class ModelRecord:
    """One model of the run. `source` is the weights' directory as the user gave it (base and
    experts only); whether and where the run keeps a model's weights is the store's decision
    (run/keeping.py), not the record's. `coefficients` are the c_k of a model built as theta_base + sum_k c_k tau_k over the
    experts (a combination, or the final model of a coefficient search); NaN otherwise."""

    id: int
    kind: ModelKind
    generation: int
    n_tasks: dataclasses.InitVar[int]
    parent1: int = -1
    parent2: int = -1
    active_task: int = -1
    w1: float = math.nan
    w2: float = math.nan
    mutation_seed: int = -1
    source: str = ""
    scores: np.ndarray = None
    test_scores: np.ndarray = None
    n_errors: int = 0
    test_errors: int = 0
    coefficients: np.ndarray = None

    def __post_init__(self, n_tasks: int):
        self.kind = ModelKind(self.kind)
        if self.scores is None:
            self.scores = np.full(n_tasks, np.nan)
        if self.test_scores is None:
            self.test_scores = np.full(n_tasks, np.nan)
        if self.coefficients is None:
            self.coefficients = np.full(n_tasks, np.nan)


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
    """The outcome of a tell: the archives the model entered, and the models that stopped
    being live (`Search.live_models`) with it."""

    job: Job
    entered: tuple[str, ...]
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
