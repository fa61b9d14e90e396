"""Scoring one model on a split of every task, sharded over any number of workers.

A split's items are cut into fixed chunks (per task, `batch_size` items in split order);
chunks are dealt to workers round-robin. Each chunk is evaluated as one batch whatever the
number of workers, and results are put back in split order, so a model's per-item scores
and metrics do not depend on how many workers (or groups) there are.

One bad item is that item's error, whatever the task: a chunk whose `evaluate` raises is
evaluated again item by item, and an item that raises alone scores 0 with the error class
``exception:<Type>`` and its traceback in the rank's log. Only a back-end that is down
(BackendUnavailable, raised by a task after its retries) ends the job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cqd_mpi.errors import BackendUnavailable, TaskError
from cqd_mpi.qd.records import Split
from cqd_mpi.tasks.base import ItemResult, Task

log = logging.getLogger("cqd_mpi.run.evaluation")


@dataclasses.dataclass(frozen=True)
class ItemChunk:
    index: int
    task: str
    item_ids: tuple[str, ...]

    def __str__(self) -> str:
        """How messages name a chunk: 'chunk 3 of task 'gsm8k' (5 items, 12 .. 16)'."""
        ids = self.item_ids
        return f"chunk {self.index} of task {self.task!r} ({len(ids)} items, {ids[0]} .. {ids[-1]})"


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
        out[chunk.index] = evaluate_chunk(tasks[chunk.task], model, chunk)
        log.debug("chunk %d (%s, %d items) in %.2fs", chunk.index, chunk.task, len(chunk.item_ids),
                  time.perf_counter() - start)
    return out


def evaluate_chunk(task: Task, model, chunk: ItemChunk) -> list[ItemResult]:
    """One chunk's results in order, each item's failure its own."""
    return isolated_results(task, chunk.item_ids, lambda ids: task.evaluate(model, ids),
                            where=f"task {task.name!r}, chunk {chunk.index}")


def isolated_results(task: Task, item_ids: Sequence[str], score: Callable[[list[str]], Sequence[ItemResult]],
                     *, where: str) -> list[ItemResult]:
    """`score(item_ids)`, checked; if it raises, each item is scored alone and one that raises scores 0."""
    try:
        results = score(list(item_ids))
    except BackendUnavailable:
        raise
    except Exception as exc:
        if len(item_ids) == 1:
            return [_item_error(where, item_ids[0], exc)]
        log.warning("%s: %s: %s; scoring its %d items one at a time", where, type(exc).__name__, exc, len(item_ids))
    else:
        return _checked(task, item_ids, results)
    results = []
    for item_id in item_ids:
        try:
            alone = score([item_id])
        except BackendUnavailable:
            raise
        except Exception as exc:
            results.append(_item_error(where, item_id, exc))
        else:
            results.extend(_checked(task, (item_id,), alone))
    return results


def _checked(task: Task, item_ids: Sequence[str], results: Sequence[ItemResult]) -> list[ItemResult]:
    if [r.item_id for r in results] != list(item_ids):
        raise TaskError(
            f"task {task.name!r} returned results for {[r.item_id for r in results][:5]}..., "
            f"expected one per item in order {list(item_ids)[:5]}..."
        )
    return list(results)


def _item_error(where: str, item_id: str, exc: Exception) -> ItemResult:
    log.error("%s, item %s: scored 0 (%s)\n%s", where, item_id, type(exc).__name__,
              "".join(traceback.format_exception(exc)).rstrip())
    return ItemResult(item_id, 0.0, error=f"exception:{type(exc).__name__}",
                      detail={"exception": f"{type(exc).__name__}: {exc}"[:500]})


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
