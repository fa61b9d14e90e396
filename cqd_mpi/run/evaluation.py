"""Scoring one model on a split of every task, sharded over any number of workers.

A split's items are cut into fixed chunks (per task, `batch_size` items in split order);
chunks are dealt to workers round-robin. Each chunk is evaluated as one batch whatever the
number of workers, and results are put back in split order, so a model's per-item scores
and metrics do not depend on how many workers (or groups) there are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from cqd_mpi.errors import TaskError
from cqd_mpi.qd.records import Split
from cqd_mpi.tasks.base import ItemResult, Task

log = logging.getLogger("cqd_mpi.run.evaluation")


@dataclasses.dataclass(frozen=True)
class ItemChunk:
    index: int
    task: str
    item_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scores:
    """A model's metrics (config task order), per-item scores and error count on one split."""

    metrics: np.ndarray
    item_scores: dict[str, np.ndarray]
    n_errors: int
    errors_by_class: dict[str, int]


def make_chunks(splits: Mapping[str, Split], split: str, batch_sizes: Mapping[str, int]) -> list[ItemChunk]:
    chunks = []
    for name, task_split in splits.items():
        ids = task_split.ids(split)
        size = batch_sizes[name]
        for start in range(0, len(ids), size):
            chunks.append(ItemChunk(len(chunks), name, tuple(ids[start:start + size])))
    return chunks


def shard(chunks: Sequence[ItemChunk], n_workers: int, worker: int) -> list[ItemChunk]:
    """Worker `worker` of `n_workers` takes every n-th chunk."""
    return [c for c in chunks if c.index % n_workers == worker]


def evaluate_chunks(tasks: Mapping[str, Task], model, chunks: Sequence[ItemChunk]) -> dict[int, list[ItemResult]]:
    """Run the chunks with the live model; results keyed by chunk index."""
    out = {}
    for chunk in chunks:
        start = time.perf_counter()
        results = tasks[chunk.task].evaluate(model, list(chunk.item_ids))
        if [r.item_id for r in results] != list(chunk.item_ids):
            raise TaskError(
                f"task {chunk.task!r} returned results for {[r.item_id for r in results][:5]}..., "
                f"expected one per item in order {list(chunk.item_ids)[:5]}..."
            )
        out[chunk.index] = results
        log.debug("chunk %d (%s, %d items) in %.2fs", chunk.index, chunk.task, len(results),
                  time.perf_counter() - start)
    return out


def combine(tasks: Mapping[str, Task], task_names: Sequence[str], chunks: Sequence[ItemChunk],
            results: Mapping[int, Sequence[ItemResult]]) -> Scores:
    """Put per-chunk results back in split order and compute each task's metric."""
    missing = [c.index for c in chunks if c.index not in results]
    if missing:
        raise RuntimeError(f"results missing for chunks {missing}")
    per_task: dict[str, list[ItemResult]] = {name: [] for name in task_names}
    for chunk in chunks:
        per_task[chunk.task].extend(results[chunk.index])
    errors: dict[str, int] = {}
    for items in per_task.values():
        for r in items:
            if r.error is not None:
                errors[r.error] = errors.get(r.error, 0) + 1
    return Scores(
        metrics=np.array([tasks[name].metric(per_task[name]) for name in task_names], dtype=np.float64),
        item_scores={name: np.array([r.score for r in per_task[name]], dtype=np.float32) for name in task_names},
        n_errors=sum(errors.values()),
        errors_by_class=errors,
    )
