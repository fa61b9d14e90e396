"""Rank 0: drives the search, builds every model on CPU, hands it to evaluation groups,
tells the results back in order, saves archive members and checkpoints after every job.

The order of work on disk makes every crash resumable: a model entering an archive is
written (atomically) before the checkpoint that refers to it; models that left every
archive are deleted (or, beyond `runtime.model_store_bytes`, members evicted: run/store.py)
only after the checkpoint; on restart, model dirs the checkpoint does not need are swept
away, missing ones rebuilt (or named as lost), and unfinished jobs are issued again.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cqd_mpi import __version__
from cqd_mpi.merging.weights import ModelDir, TensorStream, write_hf_dir
from cqd_mpi.qd.records import Job, ModelKind, Phase, RecipeKind
from cqd_mpi.qd.search import Search
from cqd_mpi.run.evaluation import combine, make_chunks
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import StateBackend
from cqd_mpi.run.store import ModelStore
from cqd_mpi.runtime.groups import EvalGroup, ModelSource, Outcome, TimedStream
from cqd_mpi.runtime.signals import StopFlag
from cqd_mpi.tasks import Task

log = logging.getLogger("cqd_mpi.conductor")


@dataclasses.dataclass
class RunFiles:
    """Where the run lives: its directory, its checkpoint, its models' store (with the builder)
    and what every checkpoint records about the launch."""

    rundir: RunDir
    backend: StateBackend
    store: ModelStore
    config_text: str
    world_size: int = 1


@dataclasses.dataclass
class Evaluation:
    """Who scores the models: the tasks, the evaluation groups, and how children reach them
    (staged for transport `file`, built ahead with pipelining, kept in memory up to `retain_bytes`)."""

    tasks: Mapping[str, Task]
    groups: Sequence[EvalGroup]
    staging_dir: Path
    prebuild: bool = False
    retain_bytes: int = 0


class Conductor:
    """Asks the search for jobs, dispatches them to the groups, tells the scores back in order
    (with the job's timings), saves what the store keeps and checkpoints after every tell."""

    def __init__(self, *, core: Search, files: RunFiles, evaluation: Evaluation, stop: StopFlag,
                 tracker=None, echo=print, drop_lost: bool = False):
        self.core = core
        self.files = files
        self.rundir = files.rundir
        self.store = files.store
        self.builder = files.store.builder
        self.tasks = evaluation.tasks
        self.groups = list(evaluation.groups)
        self.staging_dir = Path(evaluation.staging_dir)
        self.prebuild = evaluation.prebuild
        self.retain = self.builder.output.nbytes <= evaluation.retain_bytes
        self.stop = stop
        self.echo = echo
        self.tracker = tracker
        self.drop_lost = drop_lost
        self.ready: deque[Job] = deque()
        self.staged: dict[int, tuple[Path, float]] = {}
        self.built: dict[int, TimedStream] = {}
        self.batch_sizes = {name: task.batch_size for name, task in self.tasks.items()}
        self.phase_seconds = {"merge": 0.0, "transfer": 0.0, "eval": 0.0, "save": 0.0, "checkpoint": 0.0}
        self._started = time.perf_counter()

    def run(self) -> str:
        """Run until the core is done ("done") or a stop was requested ("stopped")."""
        self.core.redispatch()
        self.store.sweep()
        dropped = self.store.check(drop_lost=self.drop_lost)
        if dropped or not self.rundir.state_path.exists():
            self.checkpoint()
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        if self.tracker is not None:
            self.tracker.sync(self.core)
        buffered: dict[int, Outcome] = {}
        while True:
            if not self.stop:
                self._dispatch()
            busy = [g for g in self.groups if g.busy]
            if not busy:
                if self.core.done:
                    self._finish()
                    return "done"
                if self.stop:
                    log.warning("stopping (%s) after generation %d; the state in %s resumes",
                                self.stop.signal_name, self.core.generations_done, self.rundir.path)
                    self.checkpoint()
                    return "stopped"
                raise RuntimeError("the core has no job to give and none is in flight")
            outcome = self._wait_any(busy)
            if outcome.stop_requested:
                self.stop.set("a worker received a stop signal")
            buffered[outcome.job.model_id] = outcome
            while self.core.pending and self.core.pending[0].model_id in buffered:
                self._tell(buffered.pop(self.core.pending[0].model_id))

    def _dispatch(self) -> None:
        """Give every idle group a job; with pipelining, build one more while all are busy."""
        for group in self.groups:
            if group.busy:
                continue
            job = self.ready.popleft() if self.ready else self.core.ask()
            if job is None:
                break
            if group.agree_stop():
                self.stop.set("a worker received a stop signal")
                self.ready.appendleft(job)
                return
            self._submit(group, job)
        if self.prebuild and not self.ready and all(g.busy for g in self.groups):
            job = self.core.ask()
            if job is not None:
                if job.recipe.kind != RecipeKind.STORED:
                    self._stage(job)
                self.ready.append(job)

    def _stage(self, job: Job) -> None:
        start = time.perf_counter()
        path = self.builder.write(job.model_id, job.recipe, self.staging_dir / str(job.model_id))
        self.staged[job.model_id] = (path, time.perf_counter() - start)

    def _submit(self, group: EvalGroup, job: Job) -> None:
        chunks = make_chunks(self.core.splits, job.split, self.batch_sizes)
        if group.needs_path and job.recipe.kind != RecipeKind.STORED and job.model_id not in self.staged:
            self._stage(job)
        group.submit(job, chunks, self._source(job))

    def _source(self, job: Job) -> ModelSource:
        path, staged_s = self.staged.get(job.model_id, (None, 0.0))
        if path is None and job.recipe.kind == RecipeKind.STORED:
            path = self.builder.model_path(job.model_id)
        if path is None:
            stream = TimedStream(self.builder.stream(job.model_id, job.recipe), retain=self.retain)
            self.built[job.model_id] = stream
            return ModelSource(stream, self.builder.output.layout())
        stored = ModelDir(path)
        return ModelSource(TimedStream(stored.tensors()), stored.layout(), path=path, staged_s=staged_s)

    def _wait_any(self, busy: Sequence[EvalGroup]) -> Outcome:
        delay = 0.0005
        while True:
            for group in busy:
                outcome = group.poll()
                if outcome is not None:
                    return outcome
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def _tell(self, outcome: Outcome) -> None:
        job = outcome.job
        scores = combine(self.tasks, self.core.task_names, outcome.chunks, outcome.results)
        start = time.perf_counter()
        timings = {"merge": outcome.merge_s, "transfer": outcome.transfer_s, "eval": outcome.eval_s,
                   "total": start - outcome.started}
        told = self.core.tell(job.model_id, scores.metrics, item_scores=scores.item_scores,
                              n_errors=scores.n_errors, timings=timings)
        staged, _ = self.staged.pop(job.model_id, (None, 0.0))
        built = self.built.pop(job.model_id, None)
        target = self.store.keeps(job.model_id)
        if target is not None and staged is not None and self.core.models[job.model_id].kind == ModelKind.CHILD:
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(staged, target)
        else:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            if target is not None:
                self._write(job, built, target)
        if target is not None:
            self.store.saved(job.model_id)
        saved = time.perf_counter()
        self.checkpoint()
        if self.tracker is not None and job.phase == Phase.SEARCH:
            self.tracker.sync(self.core)
        done = time.perf_counter()
        self.store.settle()
        for key, value in (("merge", outcome.merge_s), ("transfer", outcome.transfer_s),
                           ("eval", outcome.eval_s), ("save", saved - start), ("checkpoint", done - saved)):
            self.phase_seconds[key] += value
        self.echo(self._progress_line(job, scores.metrics, told.entered, scores.n_errors))

    def _write(self, job: Job, built: TimedStream | None, out_dir: Path) -> None:
        """Save a model: from the tensors kept while it was sent, or by building it again."""
        if built is not None and built.retained is not None and built.count == len(self.builder.output.names):
            write_hf_dir(retained_stream(self.builder.output, built.retained), out_dir, like=self.builder.output,
                         max_shard_size=self.builder.max_shard_size)
        else:
            self.builder.write(job.model_id, job.recipe, out_dir)

    def checkpoint(self) -> None:
        self.files.backend.save(self.core, attrs={
            "config": self.files.config_text, "world_size": self.files.world_size, "package_version": __version__})

    def _progress_line(self, job: Job, metrics: np.ndarray, entered: Sequence[str], n_errors: int) -> str:
        names = self.core.task_names
        record = self.core.models[job.model_id]
        scores = " ".join(f"{n}={s:.3f}" for n, s in zip(names, metrics))
        elapsed = time.perf_counter() - self._started
        errors = f" errors={n_errors}" if n_errors else ""
        if job.phase == Phase.SEARCH:
            role = (f"active={names[job.recipe.active_task]:<8} child" if record.kind == ModelKind.CHILD
                    else f"{self.core.label:<15} {record.kind}")
            return (f"gen {job.generation:>4}/{self.core.generations} {role}={job.model_id:<5} {scores} "
                    f"entered=[{','.join(entered)}]{errors} {elapsed:7.1f}s")
        label = (str(record.kind) if record.kind in (ModelKind.BASE, ModelKind.AVERAGE, ModelKind.AGGREGATE)
                 else f"{record.kind} {job.model_id}")
        if record.kind == ModelKind.EXPERT:
            label = f"expert {names[self.core.expert_ids.index(job.model_id)]}"
        elif record.kind == ModelKind.CURVE:
            label = f"final@{job.generation}"
        return f"{job.phase:<6} {label:<16} {job.split:<6} {scores}{errors} {elapsed:7.1f}s"

    def _finish(self) -> None:
        from cqd_mpi.run import card
        from cqd_mpi.run.report import build_report, format_report, format_times

        report = build_report(self.core)
        report["phase_seconds"] = dict(self.phase_seconds)
        report["model_store"] = self.store.stats()
        if self.tracker is not None:
            self.tracker.final(self.core)
        self.rundir.write_json(self.rundir.final_dir / "report.json", report)
        if report["aggregate"] is not None:
            card.write_card(self.rundir.final_dir, **card.final_card(self.core, report["aggregate"]["id"]))
        self.echo(format_times(self.phase_seconds, time.perf_counter() - self._started))
        self.echo(format_report(report))


def retained_stream(base: ModelDir, tensors: list) -> TensorStream:
    """A stream over tensors already in memory, in the base's layout."""
    return TensorStream(layout=base.layout(), chunks=((name, 0, t.reshape(-1)) for name, t in tensors))
