"""MPI runtime: rank 0 conducts, every other rank is a worker with one device and one live model.

Workers are split into `eval_groups` groups; each group has a communicator with rank 0 and
evaluates one model at a time, so G groups have G models in flight. Per model, in a group:

1. stop agreement: allreduce(LOR) of every member's stop flag (SIGTERM/SIGUSR1/SIGUSR2);
2. rank 0 broadcasts a header: the job, the chunks of items, and either the tensor specs
   (transport `mpi`) or the path of a staged HF dir (transport `file`);
3. transport `mpi`: the tensors go, straight from the merge stream, into every worker's
   live model through runtime/transport.py (shared memory within a node, MPI_Bcast of
   bounded chunks between nodes);
4. each worker scores its share of the chunks and sends the per-item results to rank 0.

Rank 0 watches every step of a group (`Overdue`): a stop agreement or a transfer that makes no
progress names the group's ranks and hosts (its ranks or their node lost: nothing else ever
tells rank 0); a worker rank whose scores are not in within its chunks' deadlines plus
`runtime.eval_grace` of the model being sent is named with its host, its tasks and chunks, as
the worker's own deadline (runtime/deadline.py) cannot end the job when the rank cannot run
(stopped, swapped out, hung in the kernel). Either ends the job; RUN_DIR/logs/LOST_FILE,
stamped with the SLURM job and start, tells the job script that the run resumes (jobs/lib.sh
requeues).

mpi4py is imported only when the process runs under an MPI launcher (see `under_mpi`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from cqd_mpi.errors import ConfigError, require
from cqd_mpi.run.config import Config
from cqd_mpi.run.evaluation import ItemChunk, shard
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.runtime import shm
from cqd_mpi.runtime.deadline import chunk_deadline
from cqd_mpi.runtime.ending import abort, end_job
from cqd_mpi.runtime.groups import EvalGroup, Outcome
from cqd_mpi.runtime.signals import StopFlag
from cqd_mpi.runtime.transport import ModelBroadcast, wire_specs
from cqd_mpi.runtime.worker import Worker

log = logging.getLogger("cqd_mpi.mpi")

TAG_RESULT = 17
LOST_FILE = "lost-ranks.txt"
LOST_STATUS = 75
OVERDUE_GRACE_S = 60.0
"""Seconds a group may take for a stop agreement or for each tensor of a model's transfer."""
_LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE", "I_MPI_HYDRA_HOST_FILE")


def under_mpi() -> bool:
    """True when started by mpiexec/srun with several tasks (CQD_MPI=0/1 overrides)."""
    forced = os.environ.get("CQD_MPI")
    if forced in ("0", "1"):
        return forced == "1"
    if any(v in os.environ for v in _LAUNCHER_VARIABLES):
        return True
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def world():
    """MPI.COMM_WORLD under an MPI launcher, else None (mpi4py is not imported)."""
    if not under_mpi():
        return None
    mpi4py = require("mpi4py", extra="mpi", feature="running under mpiexec/srun")
    mpi4py.rc.threads = True
    yield_when_oversubscribed(os.environ)
    from mpi4py import MPI

    from cqd_mpi.runtime.signals import catch_early

    catch_early()
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_STEP_ID" in os.environ and tasks > 1 and MPI.COMM_WORLD.Get_size() == 1:
        # Without a PMI from srun every task is a world of one: N conductors on one run dir.
        raise ConfigError(f"srun started {tasks} tasks but MPI sees a world of 1 in each: srun gives "
                          f"this MPI library no PMI. Pass srun --mpi=pmi2 (the pip mpich wheel; "
                          f"CQD_SRUN_MPI=pmi2 for the sbatch scripts) or your site's plugin "
                          f"(srun --mpi=list; env/README.md)")
    return MPI.COMM_WORLD


def ranks_on_this_node(environ) -> int | None:
    """How many ranks the launcher started on this node: hydra's MPI_LOCALNRANKS, or the most
    per node in SLURM's SLURM_STEP_TASKS_PER_NODE ("2(x3),1"); None when neither says."""
    if environ.get("MPI_LOCALNRANKS", "").isdigit():
        return int(environ["MPI_LOCALNRANKS"])
    counts = [int(part.split("(")[0]) for part in environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(",")
              if part.split("(")[0].isdigit()]
    return max(counts) if counts else None


def yield_when_oversubscribed(environ) -> bool:
    """More ranks on the node than CPUs this process may run on (a laptop, a CI machine): MPICH's
    waiting ranks busy-poll at full speed and take the cores from the ranks with work, so ask
    it to sleep in its wait loops (MPIR_CVAR_ENABLE_HEAVY_YIELD, read at MPI_Init) unless the
    user set it. A cluster node with a core per rank keeps MPICH's default."""
    ranks = ranks_on_this_node(environ)
    if ranks is None or ranks <= len(os.sched_getaffinity(0)) or "MPIR_CVAR_ENABLE_HEAVY_YIELD" in environ:
        return False
    environ["MPIR_CVAR_ENABLE_HEAVY_YIELD"] = "1"
    return True


def guarded(comm, job):
    """Run `job()` on this rank; any exception aborts every rank of the job instead of hanging
    them. A CqdError (usually the same on every rank, e.g. a config error) is printed by rank 0
    at once; other ranks wait a moment, so the message appears once unless only they failed.
    Anything else is printed with this rank's traceback."""
    import sys
    import traceback

    from cqd_mpi.errors import CqdError, storage_error

    rank = comm.Get_rank()
    try:
        try:
            return job()
        except OSError as exc:
            error = storage_error(exc)
            if error is None:
                raise
            raise error from exc
    except CqdError as exc:
        if rank != 0:
            time.sleep(2.0)
        prefix = "" if rank == 0 else f"[rank {rank}] "
        print(f"{prefix}cqd_mpi: error: {exc}", file=sys.stderr)
        abort(comm, 2)
    except BaseException:
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(f"[rank {rank}] {line}" for line in lines), file=sys.stderr)
        print(f"[rank {rank}] cqd_mpi: aborting all {comm.Get_size()} ranks", file=sys.stderr)
        abort(comm, 1)
    return 1


def group_members(world_size: int, eval_groups: int) -> list[list[int]]:
    """Worker ranks of each group: contiguous blocks, so a group stays on few nodes."""
    workers = list(range(1, world_size))
    if eval_groups > len(workers):
        raise ConfigError(f"runtime.eval_groups: {eval_groups} groups need at least {eval_groups} "
                          f"worker ranks, but the job has {len(workers)} (world size {world_size})")
    return [list(block) for block in np.array_split(workers, eval_groups)]


def group_comms(comm, eval_groups: int):
    """Create one communicator per group (rank 0 + the group's workers); collective on all ranks."""
    members = group_members(comm.Get_size(), eval_groups)
    world_group = comm.Get_group()
    comms = []
    for ranks in members:
        sub = world_group.Incl([0, *[int(r) for r in ranks]])
        comms.append(comm.Create(sub))
        sub.Free()
    world_group.Free()
    return comms, members


class Prefetched:
    """Produces a stream in a background thread so that merging overlaps the broadcast;
    `waited` is the time the consumer spent waiting for the producer."""

    def __init__(self, stream: Iterator, depth: int = 2):
        self._stream = stream
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._cancelled = threading.Event()
        self.waited = 0.0

    def _produce(self, done) -> None:
        try:
            for item in self._stream:
                while not self._cancelled.is_set():
                    try:
                        self._items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._cancelled.is_set():
                    return
            self._items.put(done)
        except BaseException as exc:
            self._items.put(exc)

    def __iter__(self):
        done = object()
        thread = threading.Thread(target=self._produce, args=(done,), name="merge-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                start = time.perf_counter()
                item = self._items.get()
                self.waited += time.perf_counter() - start
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._cancelled.set()
            thread.join()


def host_names(comm) -> list[str] | None:
    """Every rank's host, at rank 0 (None elsewhere); collective."""
    from mpi4py import MPI

    return comm.gather(MPI.Get_processor_name(), root=0)


def lost_stamp() -> str:
    """Which start of which SLURM job wrote LOST_FILE (the job script reads only its own)."""
    return f"job {os.environ.get('SLURM_JOB_ID', '-')} start {os.environ.get('SLURM_RESTART_COUNT', '0')}"


class Overdue:
    """Rank 0's watch over its groups: a thread that ends the job when a group's step, or one
    worker rank's scores, are overdue. A worker that hangs in Python ends the job itself
    (runtime/deadline.py); one that is gone (killed, its node lost) or cannot run (stopped,
    swapped out, hung in the kernel) tells nobody, and rank 0 would wait in a poll or a
    collective for ever. Armed from a group's stop agreement until its results are in: per
    group (`rank` None) for the collective steps, per worker rank for the scores."""

    def __init__(self, run_dir: str | os.PathLike):
        self.lost_file = RunDir(run_dir).logs_dir / LOST_FILE
        self.lost_file.unlink(missing_ok=True)
        self._due: dict[tuple[int, int | None], tuple[float, str]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="overdue-groups", daemon=True).start()

    def arm(self, group: int, seconds: float, message: str, *, rank: int | None = None) -> None:
        with self._lock:
            self._due[group, rank] = (time.monotonic() + seconds, message)

    def disarm(self, group: int, *, rank: int | None = None) -> None:
        """Disarm one rank's watch, or with `rank` None every watch of the group."""
        with self._lock:
            for key in [k for k in self._due if k[0] == group and (rank is None or k[1] == rank)]:
                del self._due[key]

    def _run(self) -> None:
        import sys

        while True:
            time.sleep(0.5)
            with self._lock:
                late = [message for due, message in sorted(self._due.values()) if time.monotonic() > due]
            if late:
                print(late[0], file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    self.lost_file.write_text(f"{lost_stamp()}\n{late[0]}\n")
                end_job(LOST_STATUS)


def spans(ranks: list[int]) -> str:
    """[3, 4, 5, 7] as '3-5, 7'."""
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ", ".join(parts)


class MPIGroup(EvalGroup):
    """Rank 0's end of one group of worker ranks."""

    def __init__(self, comm, *, index: int, transport: str, stop: StopFlag, overdue: Overdue | None = None,
                 world_ranks: list[int] | None = None, hosts: list[str] | None = None,
                 deadline: Callable[[ItemChunk], float] | None = None, grace: float = OVERDUE_GRACE_S):
        self.comm = comm
        self.index = index
        self.name = f"group {index}"
        self.transport = transport
        self.needs_path = transport == "file"
        self.stop = stop
        self._job = None
        self._waiting: set[int] = set()
        self._results: dict[int, list] = {}
        self._eval_s = 0.0
        self._worker_stop = False
        self._closed = False
        self._stop_agreed = False
        self.broadcast = ModelBroadcast(comm)
        self.overdue = overdue
        self.world_ranks = world_ranks or list(range(1, comm.Get_size()))
        self.hosts = hosts
        self.deadline = deadline or (lambda _chunk: 0.0)
        self.grace = float(grace)

    def _arm(self, seconds: float, what: str) -> None:
        """Expect `what` from the group within OVERDUE_GRACE_S + `seconds`, else end the job."""
        if self.overdue is None:
            return
        where = f"ranks {spans(self.world_ranks)}"
        if self.hosts is not None:
            by_host: dict[str, list[int]] = {}
            for rank in self.world_ranks:
                by_host.setdefault(self.hosts[rank], []).append(rank)
            where = ", ".join(f"ranks {spans(ranks)} on {host}" for host, ranks in by_host.items())
        self.overdue.arm(self.index, OVERDUE_GRACE_S + seconds, (
            f"cqd_mpi: error: eval group {self.index} ({where}) gave no {what} "
            f"within {OVERDUE_GRACE_S + seconds:g} s: ranks or their node lost. Aborting the job; its state "
            "resumes from the last checkpoint."))

    def _arm_scores(self, model_id: int, chunks: list[ItemChunk]) -> None:
        """Expect each worker rank's scores within its share's deadlines plus `grace` from now."""
        if self.overdue is None:
            return
        n_workers = self.comm.Get_size() - 1
        for w in range(n_workers):
            mine = shard(chunks, n_workers, w)
            rank = self.world_ranks[w]
            host = f" on {self.hosts[rank]}" if self.hosts is not None else ""
            budget = sum(self.deadline(c) for c in mine)
            named = "; ".join(map(str, mine[:3])) + (f"; and {len(mine) - 3} more" if len(mine) > 3 else "") or "no chunks"
            self.overdue.arm(self.index, budget + self.grace, rank=w + 1, message=(
                f"cqd_mpi: error: rank {rank}{host} (eval group {self.index}) sent no scores for model {model_id} "
                f"within {budget + self.grace:g} s of receiving it, its chunks' deadlines ({budget:g} s, "
                f"runtime.eval_deadline) plus runtime.eval_grace ({self.grace:g} s): {named}. Its own deadline did "
                "not end the job, so the rank cannot run (stopped, swapped out, hung in the kernel) or is lost. "
                "Aborting the job; its state resumes from the last checkpoint."))

    def _disarm(self) -> None:
        if self.overdue is not None:
            self.overdue.disarm(self.index)

    def _progress(self, tensors, what: str):
        """The tensors, the deadline renewed as each one goes (a merge may take long in all)."""
        for item in tensors:
            self._arm(0.0, what)
            yield item

    @property
    def busy(self) -> bool:
        return self._job is not None

    def agree_stop(self) -> bool:
        from mpi4py import MPI

        self._arm(0.0, "stop agreement")
        self._stop_agreed = bool(self.comm.allreduce(bool(self.stop), op=MPI.LOR))
        self._disarm()
        return self._stop_agreed

    def submit(self, job, chunks, source):
        started = time.perf_counter()
        what = f"progress in receiving model {job.model_id}"
        self._arm(0.0, what)
        header = {"op": "eval", "job": job, "chunks": list(chunks), "path": None, "specs": None}
        waited = 0.0
        if self.transport == "file":
            header["path"] = str(source.path)
            self.comm.bcast(header, root=0)
        else:
            header["specs"] = wire_specs(source.layout)
            self.comm.bcast(header, root=0)
            tensors = Prefetched(source.stream)
            self.broadcast.send(self._progress(tensors, what))
            waited = tensors.waited
        self._disarm()
        self._arm_scores(job.model_id, list(chunks))
        transfer_s = time.perf_counter() - started - waited
        self._job = (job, list(chunks), source.stream.seconds + source.staged_s, transfer_s,
                     started - source.staged_s)
        self._waiting = set(range(1, self.comm.Get_size()))
        self._results = {}
        self._eval_s = 0.0
        self._worker_stop = False

    def poll(self):
        from mpi4py import MPI

        status = MPI.Status()
        while self._waiting and self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
            message = self.comm.recv(source=status.Get_source(), tag=TAG_RESULT)
            self._waiting.discard(status.Get_source())
            if self.overdue is not None:
                self.overdue.disarm(self.index, rank=status.Get_source())
            self._results.update(message["results"])
            self._eval_s = max(self._eval_s, message["eval_s"])
            self._worker_stop |= message["stop"]
        if self._waiting or self._job is None:
            return None
        job, chunks, merge_s, transfer_s, started = self._job
        self._job = None
        self._disarm()
        return Outcome(job=job, chunks=chunks, results=self._results, merge_s=merge_s,
                       transfer_s=transfer_s, eval_s=self._eval_s, started=started,
                       stop_requested=self._worker_stop)

    def close(self):
        if self._closed:
            return
        self._closed = True
        # After an agreement that said stop (a worker's signal), the workers already wait for
        # the header: a second agreement would never be matched.
        if not self._stop_agreed:
            self.agree_stop()
        self._arm(0.0, "answer to the end of the run")
        self.comm.bcast({"op": "stop"}, root=0)
        self.broadcast.close()
        self._disarm()


def worker_loop(comm, worker: Worker, stop: StopFlag) -> None:
    """A worker rank: agree on stopping, receive a model, score its chunks, send the results."""
    from mpi4py import MPI

    my_index = comm.Get_rank() - 1
    n_workers = comm.Get_size() - 1
    broadcast = ModelBroadcast(comm)
    while True:
        comm.allreduce(bool(stop), op=MPI.LOR)
        header = comm.bcast(None, root=0)
        if header["op"] == "stop":
            broadcast.close()
            return
        job = header["job"]
        start = time.perf_counter()
        if header["path"] is not None:
            worker.load_dir(header["path"])
        else:
            worker.receive(broadcast, header["specs"])
        loaded = time.perf_counter()
        mine = shard(header["chunks"], n_workers, my_index)
        results = worker.evaluate(mine)
        eval_s = time.perf_counter() - loaded
        log.info("model %d (%s): loaded in %.2fs, %d chunks scored in %.2fs",
                 job.model_id, job.phase, loaded - start, len(mine), eval_s)
        comm.send({"results": results, "eval_s": eval_s, "stop": bool(stop)}, dest=0, tag=TAG_RESULT)


def serve(comm, config: Config, *, stop: StopFlag | None = None) -> None:
    """A worker rank's whole job: join its eval group, build its engine, score what comes."""

    rank = comm.Get_rank()
    comms, members = group_comms(comm, config.runtime.eval_groups)
    host_names(comm)
    my_group = next(i for i, ranks in enumerate(members) if rank in ranks)
    stop = (stop or StopFlag()).install()
    worker = Worker(config, rank=rank, world_size=comm.Get_size())
    log.info("worker rank %d (pid %d) in eval group %d", rank, os.getpid(), my_group)
    _ = worker.engine  # build the live model before the first model arrives
    shm.record()
    try:
        worker_loop(comms[my_group], worker, stop)
    finally:
        stop.uninstall()
        worker.close()


def conductor_groups(comm, config: Config, stop: StopFlag, tasks) -> list[MPIGroup]:
    """Rank 0's end of every eval group (collective with the workers' `serve`), watched by
    one `Overdue`: each worker rank has the deadlines of its share of the chunks, plus
    `runtime.eval_grace`."""
    comms, members = group_comms(comm, config.runtime.eval_groups)
    hosts = host_names(comm)
    overdue = Overdue(config.runtime.run_dir)

    def deadline(chunk: ItemChunk) -> float:
        return chunk_deadline(config.runtime.eval_deadline, tasks[chunk.task], chunk.item_ids)

    groups = [MPIGroup(c, index=i, transport=config.runtime.transport, stop=stop, overdue=overdue,
                       world_ranks=members[i], hosts=hosts, deadline=deadline, grace=config.runtime.eval_grace)
              for i, c in enumerate(comms)]
    shm.record()
    return groups
