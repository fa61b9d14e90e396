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
