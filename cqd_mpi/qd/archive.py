"""MAP-Elites archives of CycleQD: one per task, a grid over the other tasks' metrics.

Archive k keeps one model per cell of the grid over the K-1 behaviour axes (the other
tasks, in config order); its quality is task k's metric. A model enters a cell when the
cell is empty or its quality is strictly higher than the occupant's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bins:
    """Equal-width bins of one metric on [lower, upper]; values outside go to the edge bins."""

    lower: float
    upper: float
    n_bins: int

    def __post_init__(self):
        if not self.upper > self.lower:
            raise ValueError(f"bins need upper > lower, got lower={self.lower}, upper={self.upper}")
        if self.n_bins < 1:
            raise ValueError(f"bins need n_bins >= 1, got {self.n_bins}")

    def index(self, value: float) -> int:
        position = (value - self.lower) / (self.upper - self.lower) * self.n_bins
        return int(np.clip(np.floor(position), 0, self.n_bins - 1))

    def edges(self) -> np.ndarray:
        return np.linspace(self.lower, self.upper, self.n_bins + 1)

    @classmethod
    def from_experts(cls, scores: Sequence[float], *, n_bins: int, lower_factor: float = 0.85,
                     upper_factor: float = 1.15) -> Bins:
        """DESIGN.md auto bins: 0.85 x worst expert to 1.15 x best expert.

        When every expert scores the same (e.g. all zero), the range would be empty; it is
        widened to a width of 1/n_bins above the lower edge so that bins stay usable.
        """
        lower = lower_factor * float(min(scores))
        upper = upper_factor * float(max(scores))
        if not upper > lower:
            upper = lower + 1.0 / n_bins
        return cls(lower=lower, upper=upper, n_bins=n_bins)


@dataclasses.dataclass(frozen=True)
class Offer:
    """What happened when a model was offered to an archive."""

    entered: bool
    cell: tuple[int, ...]
    evicted: int = -1


class Archive:
    """The grid of one quality task. Cells hold a model id (-1 empty), its quality, and an
    insertion stamp (larger = more recent) that breaks ties when choosing the elite."""

    def __init__(self, *, quality_task: int, bc_tasks: Sequence[int], bins: Sequence[Bins]):
        if len(bc_tasks) != len(bins):
            raise ValueError(f"expected one Bins per behaviour task, got {len(bins)} for {len(bc_tasks)}")
        self.quality_task = int(quality_task)
        self.bc_tasks = tuple(int(t) for t in bc_tasks)
        self.bins = tuple(bins)
        shape = tuple(b.n_bins for b in self.bins)
        self.occupant = np.full(shape, -1, dtype=np.int64)
        self.quality = np.full(shape, np.nan, dtype=np.float64)
        self.inserted = np.full(shape, -1, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.occupant.shape

    def cell(self, scores: Sequence[float]) -> tuple[int, ...]:
        """The cell of a model with per-task metrics `scores` (all K tasks, config order)."""
        return tuple(b.index(scores[t]) for t, b in zip(self.bc_tasks, self.bins))

    def offer(self, model_id: int, scores: Sequence[float], stamp: int) -> Offer:
        cell = self.cell(scores)
        quality = float(scores[self.quality_task])
        occupant = int(self.occupant[cell])
        if occupant >= 0 and not quality > self.quality[cell]:
            return Offer(entered=False, cell=cell)
        self.occupant[cell] = model_id
        self.quality[cell] = quality
        self.inserted[cell] = stamp
        return Offer(entered=True, cell=cell, evicted=occupant)

    def members(self) -> np.ndarray:
        """Occupant ids in C order of their cells."""
        flat = self.occupant.reshape(-1)
        return flat[flat >= 0]

    def elite(self) -> int:
        """The occupant with the highest quality; ties go to the most recently inserted."""
        flat_q = self.quality.reshape(-1)
        occupied = np.flatnonzero(self.occupant.reshape(-1) >= 0)
        if occupied.size == 0:
            raise ValueError("the archive is empty")
        order = np.lexsort((self.inserted.reshape(-1)[occupied], flat_q[occupied]))
        return int(self.occupant.reshape(-1)[occupied[order[-1]]])

    def qd_score(self) -> float:
        """Sum of the qualities of occupied cells."""
        return float(np.nansum(self.quality))

    def coverage(self) -> float:
        return float(np.count_nonzero(self.occupant >= 0) / self.occupant.size)


def elite_weights(scores: np.ndarray, *, alpha_low: float, alpha_high: float) -> np.ndarray:
    """Sampling probabilities of the paper's elite sampling.

    `scores` is (N models, K tasks). gamma_j = prod_k (a_low + norm(f_jk) (a_high - a_low)),
    with min/max normalisation over the N models; a task whose max == min contributes a
    constant factor. Returns gamma / sum(gamma).
    """
    scores = np.asarray(scores, dtype=np.float64)
    lo = scores.min(axis=0)
    span = scores.max(axis=0) - lo
    normalised = np.divide(scores - lo, span, out=np.zeros_like(scores), where=span > 0)
    gamma = np.prod(alpha_low + normalised * (alpha_high - alpha_low), axis=1)
    return gamma / gamma.sum()


def sample_parents(rng: np.random.Generator, members: np.ndarray, scores: np.ndarray, *,
                   method: str, alpha_low: float, alpha_high: float) -> tuple[int, int]:
    """Two distinct parents drawn without replacement; a single member is both parents."""
    members = np.asarray(members)
    if members.size == 0:
        raise ValueError("cannot sample parents from an empty archive")
    if members.size == 1:
        return int(members[0]), int(members[0])
    if method == "elite":
        p = elite_weights(scores, alpha_low=alpha_low, alpha_high=alpha_high)
    elif method == "random":
        p = None
    else:
        raise ValueError(f"sampling method must be 'elite' or 'random', got {method!r}")
    first, second = rng.choice(members.size, size=2, replace=False, p=p)
    return int(members[first]), int(members[second])
