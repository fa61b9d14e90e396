"""The records of a CycleQD run: models, jobs and their recipes, history rows, item splits.

Plain data that the core creates and tells about, that state files store, and that the
analysis reads back; none of it names a file of the run directory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from cqd_mpi import seeding

PHASES = ("init", "search", "final", "done")
SPLITS = ("search", "test")
MODEL_KINDS = ("base", "expert", "child", "average", "aggregate", "combination")
"""combination: theta_base + sum_k c_k tau_k over the experts, with its own `coefficients`
(a candidate of the coefficient searches, CMA-ES and NSGA-II)."""


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to build a model's weights.

    kind "stored": the weights the run keeps for the job's model (the base and experts
    where the user keeps them, archive members in the run directory). kind "crossover":
    parents, crossover weights, active task (for the expert mutation basis) and mutation
    seed. kind "aggregate": theta_base + sum_i betas[i] * tau(members[i]).
    """

    kind: str
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
    """One model of the run. `source` is the weights' directory as the user gave it (base and
    experts only); `archived` says that a child entered an archive at some point, and `saved`
    that its weights are kept now (it is still in an archive, or it is the final aggregate).
    `coefficients` are the c_k of a model built as theta_base + sum_k c_k tau_k over the
    experts (a combination, or the final model of a coefficient search); NaN otherwise."""

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
    archived: bool = False
    source: str = ""
    scores: np.ndarray = None
    test_scores: np.ndarray = None
    n_errors: int = 0
    test_errors: int = 0
    coefficients: np.ndarray = None

    def __post_init__(self, n_tasks: int):
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
