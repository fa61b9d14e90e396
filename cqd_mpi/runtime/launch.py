"""Starting or resuming a run: the one place that decides between one process and MPI.

`start(load)` is what `python -m cqd_mpi run CONFIG` (and the demo) calls on every rank: it
finds the MPI world, loads the config (`load(comm)`), sends each rank's log to
RUN_DIR/logs, and runs; under MPI, an exception on any rank aborts every rank with that
rank's traceback (`mpi.guarded`), and each rank first removes the shared-memory segments that
ended jobs left on its node and records its own (runtime/shm.py). `run(config)` pins the
torch thread count first (`runtime.threads`, on every rank), then: with one rank (or no
MPI), rank 0 evaluates in-process through the conductor; with more, rank 0 conducts and
every other rank serves as a worker (runtime/mpi.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from cqd_mpi.errors import StateError
from cqd_mpi.qd.archive import Bins
from cqd_mpi.qd.methods import method_class
from cqd_mpi.qd.records import make_splits
from cqd_mpi.qd.search import Search
from cqd_mpi.run import integrity, vision
from cqd_mpi.run.config import BinsConfig, Config, parse_size
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend, StateBackend
from cqd_mpi.run.store import ModelStore
from cqd_mpi.run.tracking import Tracker
from cqd_mpi.runtime import mpi, shm
from cqd_mpi.runtime.conductor import Conductor, Evaluation, RunFiles
from cqd_mpi.runtime.groups import EvalGroup, InProcessGroup
from cqd_mpi.runtime.signals import StopFlag
from cqd_mpi.runtime.worker import Worker, build_tasks
from cqd_mpi.tasks import Task

log = logging.getLogger("cqd_mpi.launch")


def new_core(config: Config, tasks: Mapping[str, Task], paths: tuple[str, list[str]] | None = None) -> Search:
    """A new search for the config: its parameters, its method's strategy, the tasks' item splits;
    `paths` (base, experts) where the models are not the config's own (run/vision.py's lifted ones)."""
    splits = make_splits({name: task.item_ids() for name, task in tasks.items()},
                         seed=config.runtime.seed, search_fraction=config.qd.search_fraction)
    bins = [Bins(t.bins.lower, t.bins.upper, t.bins.n_bins) if isinstance(t.bins, BinsConfig) else None
            for t in config.tasks]
    method = method_class(config.qd.method)
    base_path, expert_paths = paths or (config.base, [config.expert_path(n) for n in config.task_names])
    return Search(params=config.search_params(), strategy=method(method.settings_from(config.qd)),
                  task_names=config.task_names, splits=splits, bins=bins, base_path=base_path,
                  expert_paths=expert_paths)


def check_restored(core: Search, config: Config, tasks: Mapping[str, Task]) -> Search:
    """A search read back from state.h5, checked against the config and the tasks' data."""
    if type(core.strategy) is not method_class(config.qd.method):
        raise StateError(f"state.h5 holds a run of method {core.method!r}, the config asks for {config.qd.method!r}")
    if list(core.task_names) != config.task_names:
        raise StateError(f"state.h5 holds tasks {list(core.task_names)}, the config {config.task_names}")
    for name, task in tasks.items():
        known = set(task.item_ids())
        stored = set(core.splits[name].search) | set(core.splits[name].test)
        if not stored <= known:
            lost = sorted(stored - known)[:5]
            raise StateError(f"task {name!r}: items {lost} of the saved split are no longer in its data; "
                             "the task data changed since the run started")
    return core


def check_inputs(core: Search, rundir: RunDir, backend: StateBackend, *, force: bool, echo) -> None:
    """The base's and the experts' files against the digests state.h5 recorded at the run's
    first start (run/integrity.py): a changed one is refused; every later save records them."""
    models = {"base": rundir.weights_of(core.models[core.base_id]),
              **{f"expert of task {name!r}": rundir.weights_of(core.models[e])
                 for name, e in zip(core.task_names, core.expert_ids)}}
    recorded = backend.recorded.get(integrity.INPUTS_ATTR)
    text, _ = integrity.check_inputs(models, recorded, holder=backend.describe(), root=rundir.path, force=force,
                                     warn=echo)
    if backend.recorded and text != recorded:
        backend.rebound = True
    backend.binding = {**backend.binding, integrity.INPUTS_ATTR: text}


def conduct(config: Config, *, force: bool = False, drop_lost: bool = False, world_size: int = 1,
            make_groups: Callable[[dict[str, Task]], list[EvalGroup]] | None = None,
            stop: StopFlag | None = None, echo=print) -> str:
    """Rank 0's whole job. Returns "done" or "stopped" (preempted; the state resumes)."""
    rundir = RunDir(config.runtime.run_dir)
    rundir.prepare(config, force=force)
    lock = rundir.lock()
    try:
        backend = HDF5Backend(rundir.state_path, keep_backup=config.runtime.keep_backup)
        core = backend.resume(config.to_dict(), threads=thread_count(), force=force)
        rundir.freeze(config)
        tasks = build_tasks(config, rank=0, world_size=world_size)
        fresh = core is None
        layout = vision.layout(config)
        base_path, expert_paths = vision.model_paths(config, rundir.path, layout)
        if fresh:
            core = new_core(config, tasks, (base_path, expert_paths))
        else:
            check_restored(core, config, tasks)
            echo(f"resuming {rundir.path}: phase {core.phase}, generation {core.generations_done}/"
                 f"{core.generations}")
        check_inputs(core, rundir, backend, force=force, echo=echo)
        budget = config.runtime.model_store_bytes
        store = ModelStore(core=core, rundir=rundir, echo=echo, mutation=config.qd.mutation, vision=layout,
                           basis_cache=config.runtime.basis_cache, max_shard_size=config.runtime.max_shard_size,
                           max_depth=config.runtime.model_store_depth,
                           budget=None if budget is None else parse_size(budget, "runtime.model_store_bytes"))
        if fresh:
            store.builder.check()
        groups = make_groups(tasks) if make_groups else [InProcessGroup(Worker(config, tasks=tasks))]
        tracker = Tracker.from_config(config.tracking, rundir, name=rundir.path.name, config=config.to_dict())
        stop = (stop if stop is not None else StopFlag()).install()
        files = RunFiles(rundir=rundir, backend=backend, store=store, config_text=config.to_yaml(),
                         world_size=world_size)
        evaluation = Evaluation(tasks=tasks, groups=groups, staging_dir=rundir.staging_dir(config.runtime.staging_dir),
                                prebuild=config.runtime.pipeline_depth > 0,
                                retain_bytes=parse_size(config.runtime.retain_child_bytes))
        conductor = Conductor(core=core, files=files, evaluation=evaluation, stop=stop, tracker=tracker,
                              echo=echo, drop_lost=drop_lost)
        if backend.rebound:
            conductor.checkpoint()
        try:
            status = conductor.run()
        finally:
            stop.uninstall()
            if tracker is not None:
                tracker.close()
            for task in tasks.values():
                task.close()
        for group in groups:
            group.close()
        return status
    finally:
        lock.close()


def pin_threads(config: Config) -> None:
    """`runtime.threads` torch threads in this process (results depend on the count)."""
    if config.runtime.threads is not None:
        import torch

        torch.set_num_threads(config.runtime.threads)


def thread_count() -> int:
    """The torch thread count this process computes with (after `pin_threads`): what state.h5
    records as `threads` and a resume must match."""
    import torch

    return torch.get_num_threads()


def run(config: Config, *, force: bool = False, drop_lost: bool = False, comm=None, echo=print) -> int:
    """Entry point on every rank (`comm`: MPI.COMM_WORLD, or None for one process): exit
    status 0 when done or cleanly stopped for requeue."""
    pin_threads(config)
    log.info("rank %d: %d torch thread(s)", comm.Get_rank() if comm is not None else 0, thread_count())
    if comm is None or comm.Get_size() == 1:
        conduct(config, force=force, drop_lost=drop_lost, echo=echo)
        return 0
    if comm.Get_rank() == 0:
        stop = StopFlag()
        conduct(config, force=force, drop_lost=drop_lost, world_size=comm.Get_size(), stop=stop, echo=echo,
                make_groups=lambda tasks: mpi.conductor_groups(comm, config, stop, tasks))
    else:
        mpi.serve(comm, config)
    comm.Barrier()
    return 0


def log_to_files(run_dir: str, rank: int) -> None:
    """Every rank logs to RUN_DIR/logs/rank-N.log; rank 0 also to the console, workers only
    their warnings."""
    logs = RunDir(run_dir).logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank-{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if rank > 0:
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)


def start(load: Callable[[object], Config], *, force: bool = False, drop_lost: bool = False, echo=print) -> int:
    """Load the config on every rank (`load(comm)`, comm None outside MPI) and run it."""
    comm = mpi.world()

    def job() -> int:
        if comm is not None:
            shm.sweep()
            shm.record()
        config = load(comm)
        log_to_files(config.runtime.run_dir, comm.Get_rank() if comm is not None else 0)
        status = run(config, force=force, drop_lost=drop_lost, comm=comm, echo=echo)
        if comm is not None:
            shm.forget()
        return status

    if comm is None or comm.Get_size() == 1:
        return job()
    return mpi.guarded(comm, job)
