"""What every evaluating process holds: the task instances and one live engine.

The same Worker runs inside rank 0 when there is one rank, and on every worker rank under
MPI. Each model the conductor sends replaces the engine's weights in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from cqd_mpi import faults
from cqd_mpi.engines import Engine, create
from cqd_mpi.run import vision
from cqd_mpi.run.config import Config, task_settings
from cqd_mpi.run.evaluation import ItemChunk, evaluate_chunks
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.runtime.deadline import Watchdog, chunk_deadline
from cqd_mpi.tasks import Task, TaskContext, task_class
from cqd_mpi.tasks.base import ItemResult

log = logging.getLogger("cqd_mpi.worker")


def build_tasks(config: Config, *, rank: int = 0, world_size: int = 1,
                work_root: Path | None = None) -> dict[str, Task]:
    """One instance of every configured task for this process, in config order."""
    tasks = {}
    work_root = Path(work_root or RunDir(config.runtime.run_dir).work_dir)
    for i, task_config in enumerate(config.tasks):
        cls = task_class(task_config.kind, f"tasks[{i}].kind")
        work_dir = work_root / f"rank-{rank}" / task_config.name
        work_dir.mkdir(parents=True, exist_ok=True)
        context = TaskContext(rank=rank, world_size=world_size, work_dir=work_dir,
                              seed=config.runtime.seed, config_dir=Path(config.runtime.run_dir))
        task = cls(name=task_config.name, data=task_config.data,
                   settings=task_settings(task_config, f"tasks[{i}]"), context=context)
        task.batch_size = task_config.batch_size
        tasks[task_config.name] = task
    return tasks


class Worker:
    """Task instances and a lazily built engine (on the base model's directory)."""

    def __init__(self, config: Config, *, rank: int = 0, world_size: int = 1,
                 tasks: dict[str, Task] | None = None):
        self.config = config
        self.rank = rank
        self.tasks = tasks if tasks is not None else build_tasks(config, rank=rank, world_size=world_size)
        self._engine: Engine | None = None
        self._watchdog = Watchdog()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            engine = self.config.engine
            self._engine = create(engine.kind, vision.engine_dir(self.config), device=engine.device, dtype=engine.dtype,
                                  settings=engine.settings)
            log.info("rank %d: engine %s", self.rank, self._engine.describe())
        return self._engine

    def load(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A complete update from a stream of named tensors."""
        self.engine.update(stream)

    def load_dir(self, path: str | Path) -> None:
        """A complete update from a Hugging Face dir (transport `file`)."""
        self.engine.update_from_dir(path)

    def receive(self, broadcast, specs) -> None:
        """A complete update through the `mpi` transport (runtime/transport.py)."""
        broadcast.receive(self.engine, specs)
        self.engine.finish_update()

    def evaluate(self, chunks: Sequence[ItemChunk]) -> dict[int, list[ItemResult]]:
        """Score the chunks, each under its deadline (runtime/deadline.py)."""
        faults.point("eval")
        results = {}
        for chunk in chunks:
            seconds = chunk_deadline(self.config.runtime.eval_deadline, self.tasks[chunk.task], chunk.item_ids)
            with self._watchdog.watch(seconds, self._overran(chunk, seconds)):
                faults.point("chunk")
                results.update(evaluate_chunks(self.tasks, self.engine, [chunk]))
        return results

    def _overran(self, chunk: ItemChunk, seconds: float) -> str:
        return (f"[rank {self.rank}] cqd_mpi: error: {chunk} ran past its deadline of {seconds:g} s "
                f"(runtime.eval_deadline); aborting the job. The state in {self.config.runtime.run_dir} "
                "resumes: rerun the same command.")

    def close(self) -> None:
        for task in self.tasks.values():
            task.close()
        if self._engine is not None:
            self._engine.close()
