"""Evaluation groups: the units the conductor hands one model at a time.

A group receives a model's tensors and the chunks of items to score, and later returns
the per-chunk results. The in-process group evaluates on rank 0 itself (one-rank runs);
runtime/mpi.py provides a group of worker ranks.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from cqd_mpi import faults
from cqd_mpi.qd.records import Job
from cqd_mpi.run.evaluation import ItemChunk
from cqd_mpi.runtime.worker import Worker
from cqd_mpi.tasks.base import ItemResult


class TimedStream:
    """Wraps a tensor stream and accounts the time spent producing it (the merge).

    With `retain`, the tensors are also kept (`retained`), so that a child that enters an
    archive can be saved without merging it again; the stream must then yield a new tensor
    per name, as merge streams do.
    """

    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]], *, retain: bool = False):
        self._stream = iter(stream)
        self.seconds = 0.0
        self.nbytes = 0
        self.count = 0
        self.retained: list[tuple[str, torch.Tensor]] | None = [] if retain else None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        start = time.perf_counter()
        try:
            name, tensor = next(self._stream)
        finally:
            self.seconds += time.perf_counter() - start
        self.nbytes += tensor.numel() * tensor.element_size()
        self.count += 1
        if self.retained is not None:
            self.retained.append((name, tensor))
        if self.count == 2:
            faults.point("merge")
        return name, tensor


@dataclasses.dataclass
class ModelSource:
    """A model ready to send: its tensor stream, their layout (name -> shape, dtype) in stream
    order, and the HF dir that holds it when there is one (a stored model, or a child staged
    for transport `file`)."""

    stream: TimedStream
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]
    path: Path | None = None
    staged_s: float = 0.0


@dataclasses.dataclass
class Outcome:
    job: Job
    chunks: Sequence[ItemChunk]
    results: dict[int, list[ItemResult]]
    merge_s: float
    transfer_s: float
    eval_s: float
    started: float
    stop_requested: bool = False


class EvalGroup(abc.ABC):
    """One model in flight at a time."""

    name: str = "group"
    needs_path: bool = False

    @property
    @abc.abstractmethod
    def busy(self) -> bool: ...

    @abc.abstractmethod
    def submit(self, job: Job, chunks: Sequence[ItemChunk], source: ModelSource) -> None:
        """Send the model and start its evaluation."""

    def agree_stop(self) -> bool:
        """Whether any process of the group was asked to stop (called before each submit)."""
        return False

    @abc.abstractmethod
    def poll(self) -> Outcome | None:
        """The finished outcome, or None while the evaluation runs. Never blocks for long."""

    def close(self) -> None:
        """Tell the group's processes to exit. Collective for a group of ranks, so it is called
        only after a run that ended well: on the way out of a failure the other ranks may be
        inside another collective (a broadcast), and the abort that follows ends them."""


class InProcessGroup(EvalGroup):
    """Evaluates on this process with its own Worker; submit() returns when scoring is done."""

    name = "rank 0"

    def __init__(self, worker: Worker):
        self.worker = worker
        self._outcome: Outcome | None = None
        _ = worker.engine  # built now, so that start-up is not billed to the first model

    @property
    def busy(self) -> bool:
        return self._outcome is not None

    def submit(self, job, chunks, source):
        started = time.perf_counter()
        self.worker.load(source.stream)
        loaded = time.perf_counter()
        results = self.worker.evaluate(chunks)
        done = time.perf_counter()
        merge_s = source.stream.seconds
        self._outcome = Outcome(job=job, chunks=chunks, results=results, merge_s=merge_s + source.staged_s,
                                transfer_s=loaded - started - merge_s, eval_s=done - loaded,
                                started=started - source.staged_s)

    def poll(self):
        outcome, self._outcome = self._outcome, None
        return outcome
