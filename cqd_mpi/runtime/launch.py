"""Starting or resuming a run: run dir, state, core, tasks, builder, evaluation groups.

`run(config)` is what `python -m cqd_mpi run CONFIG` calls on every rank. Under MPI with
more than one rank it hands over to runtime/mpi.py; with one rank (or no MPI) rank 0
evaluates in-process through the same conductor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from cqd_mpi.errors import StateError
from cqd_mpi.merging.builder import ModelBuilder
from cqd_mpi.qd.archive import Bins
from cqd_mpi.qd.cycleqd import CycleQD, make_splits
from cqd_mpi.run.config import BinsConfig, Config, parse_size
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.runtime.conductor import Conductor
from cqd_mpi.runtime.groups import EvalGroup, InProcessGroup
from cqd_mpi.runtime.signals import StopFlag
from cqd_mpi.runtime.worker import Worker, build_tasks
from cqd_mpi.tasks import Task

log = logging.getLogger("cqd_mpi.launch")


def new_core(config: Config, tasks: Mapping[str, Task]) -> CycleQD:
    qd = config.qd
    splits = make_splits({name: task.item_ids() for name, task in tasks.items()},
                         seed=config.runtime.seed, search_fraction=qd.search_fraction)
    bins = [Bins(t.bins.lower, t.bins.upper, t.bins.n_bins) if isinstance(t.bins, BinsConfig) else None
            for t in config.tasks]
    return CycleQD(
        task_names=config.task_names, base_path=config.base,
        expert_paths=[config.expert_path(n) for n in config.task_names], splits=splits,
        generations=qd.generations, seed=config.runtime.seed, bins=bins, n_bins=qd.n_bins,
        bc_lower_factor=qd.bc_lower_factor, bc_upper_factor=qd.bc_upper_factor, sampling=qd.sampling,
        alpha_low=qd.alpha_low, alpha_high=qd.alpha_high, crossover_mu=qd.crossover.mu,
        crossover_sigma=qd.crossover.sigma, pipeline_depth=config.runtime.pipeline_depth)


def restore_core(tree: dict, config: Config, tasks: Mapping[str, Task]) -> CycleQD:
    core = CycleQD.from_state_dict(tree)
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


def conduct(config: Config, *, force: bool = False, world_size: int = 1,
            make_groups: Callable[[dict[str, Task]], list[EvalGroup]] | None = None,
            stop: StopFlag | None = None, echo=print) -> str:
    """Rank 0's whole job. Returns "done" or "stopped" (preempted; the state resumes)."""
    rundir = RunDir(config.runtime.run_dir)
    rundir.prepare(config, force=force)
    lock = rundir.lock()
    try:
        backend = rundir.backend(keep_backup=config.runtime.keep_backup)
        tasks = build_tasks(config, rank=0, world_size=world_size)
        tree = backend.load()
        if tree is None:
            core = new_core(config, tasks)
        else:
            core = restore_core(tree, config, tasks)
            echo(f"resuming {rundir.path}: phase {core.phase}, generation {core.generations_done}/"
                 f"{core.generations}")
        builder = ModelBuilder(
            base_path=config.base, expert_paths=[config.expert_path(n) for n in config.task_names],
            model_path=lambda m: rundir.resolve(core.models[m].path), resolve=rundir.resolve,
            mutation=config.qd.mutation, basis_cache=config.runtime.basis_cache,
            max_shard_size=config.runtime.max_shard_size)
        if tree is None:
            builder.check()
        groups = make_groups(tasks) if make_groups else [InProcessGroup(Worker(config, tasks=tasks))]
        stop = (stop if stop is not None else StopFlag()).install()
        conductor = Conductor(core=core, tasks=tasks, builder=builder, groups=groups, rundir=rundir,
                              backend=backend, stop=stop, config_text=config.to_yaml(),
                              world_size=world_size, staging_dir=config.runtime.staging_dir,
                              prebuild=config.runtime.pipeline_depth > 0,
                              retain_bytes=parse_size(config.runtime.retain_child_bytes), echo=echo)
        try:
            return conductor.run()
        finally:
            stop.uninstall()
            for group in groups:
                group.close()
            for task in tasks.values():
                task.close()
    finally:
        lock.close()


def run(config: Config, *, force: bool = False, echo=print) -> int:
    """Entry point on every rank: exit status 0 when done or cleanly stopped for requeue."""
    from cqd_mpi.runtime import mpi

    if config.runtime.threads is not None:
        import torch

        torch.set_num_threads(config.runtime.threads)
    comm = mpi.world()
    if comm is not None and comm.Get_size() > 1:
        return mpi.run(comm, config, force=force, echo=echo)
    conduct(config, force=force, echo=echo)
    return 0
