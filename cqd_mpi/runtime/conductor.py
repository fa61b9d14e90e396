"""Rank 0: drives the CycleQD core, builds every model on CPU, hands it to evaluation groups,
tells the results back in order, saves archive members and checkpoints after every job.

The order of work on disk makes every crash resumable: a model entering an archive is
written (atomically) before the checkpoint that refers to it; models that left every
archive are deleted (or, beyond `runtime.model_store_bytes`, members evicted: run/store.py)
only after the checkpoint; on restart, model dirs the checkpoint does not need are swept
away, missing ones rebuilt (or named as lost), and unfinished jobs are issued again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cqd_mpi import __version__
from cqd_mpi.merging.builder import ModelBuilder
from cqd_mpi.merging.weights import ModelDir, TensorStream, write_hf_dir
from cqd_mpi.qd.cycleqd import CycleQD
from cqd_mpi.qd.records import Job
from cqd_mpi.run.evaluation import combine, make_chunks
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import StateBackend
from cqd_mpi.run.store import ModelStore
from cqd_mpi.runtime.groups import EvalGroup, ModelSource, Outcome, TimedStream
from cqd_mpi.runtime.signals import StopFlag
from cqd_mpi.tasks import Task

log = logging.getLogger("cqd_mpi.conductor")


class Conductor:
    def __init__(self, *, core: CycleQD, tasks: Mapping[str, Task], builder: ModelBuilder,
                 groups: Sequence[EvalGroup], rundir: RunDir, backend: StateBackend,
                 stop: StopFlag, config_text: str, world_size: int = 1,
                 staging_dir: Path | None = None, prebuild: bool = False,
                 retain_bytes: int = 0, tracker=None, echo=print, store: ModelStore,
                 drop_lost: bool = False):
        self.core = core
        self.tasks = tasks
        self.builder = builder
        self.groups = list(groups)
        self.rundir = rundir
        self.backend = backend
        self.stop = stop
        self.config_text = config_text
        self.world_size = world_size
        self.echo = echo
        self.tracker = tracker
        self.store = store
        self.drop_lost = drop_lost
        self.staging_dir = Path(staging_dir) if staging_dir else rundir.staging_dir()
        self.prebuild = prebuild
        self.ready: deque[Job] = deque()
        self.staged: dict[int, tuple[Path, float]] = {}
        self.retain = builder.output.nbytes <= retain_bytes
        self.built: dict[int, TimedStream] = {}
        self.batch_sizes = {name: task.batch_size for name, task in tasks.items()}
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
                if job.recipe.kind != "stored":
                    self._stage(job)
                self.ready.append(job)

    def _stage(self, job: Job) -> None:
        start = time.perf_counter()
        path = self.builder.write(job.model_id, job.recipe, self.staging_dir / str(job.model_id))
        self.staged[job.model_id] = (path, time.perf_counter() - start)

    def _submit(self, group: EvalGroup, job: Job) -> None:
        chunks = make_chunks(self.core.splits, job.split, self.batch_sizes)
        if group.needs_path and job.recipe.kind != "stored" and job.model_id not in self.staged:
            self._stage(job)
        group.submit(job, chunks, self._source(job))

    def _source(self, job: Job) -> ModelSource:
        path, staged_s = self.staged.get(job.model_id, (None, 0.0))
        if path is None and job.recipe.kind == "stored":
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
        told = self.core.tell(job.model_id, scores.metrics, item_scores=scores.item_scores,
                              n_errors=scores.n_errors)
        start = time.perf_counter()
        staged, _ = self.staged.pop(job.model_id, (None, 0.0))
        built = self.built.pop(job.model_id, None)
        if told.save:
            target = self.rundir.model_dir(job.model_id)
            if staged is not None:
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(staged, target)
            else:
                self._write(job, built, target)
            self.store.saved(job.model_id)
        elif staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if self.core.models[job.model_id].kind == "aggregate":
            self._write(job, built, self.rundir.final_dir)
        saved = time.perf_counter()
        total = saved - outcome.started
        if job.phase == "search":
            self.core.record_timings(job.generation, {
                "merge": outcome.merge_s, "transfer": outcome.transfer_s, "eval": outcome.eval_s,
                "total": total})
        self.checkpoint()
        if self.tracker is not None and job.phase == "search":
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
        self.backend.save(self.core, attrs={
            "config": self.config_text, "world_size": self.world_size, "package_version": __version__})

    def _progress_line(self, job: Job, metrics: np.ndarray, entered: Sequence[str], n_errors: int) -> str:
        names = self.core.task_names
        record = self.core.models[job.model_id]
        scores = " ".join(f"{n}={s:.3f}" for n, s in zip(names, metrics))
        elapsed = time.perf_counter() - self._started
        errors = f" errors={n_errors}" if n_errors else ""
        if job.phase == "search":
            role = (f"active={names[job.recipe.active_task]:<8} child" if record.kind == "child"
                    else f"{self.core.label:<15} {record.kind}")
            return (f"gen {job.generation:>4}/{self.core.generations} {role}={job.model_id:<5} {scores} "
                    f"entered=[{','.join(entered)}]{errors} {elapsed:7.1f}s")
        label = record.kind if record.kind in ("base", "average", "aggregate") else f"{record.kind} {job.model_id}"
        if record.kind == "expert":
            label = f"expert {names[self.core.expert_ids.index(job.model_id)]}"
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
