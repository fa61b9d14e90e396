"""Cases that hold on a communicator of any size, in mpi4py's own style.

Each case takes a communicator: tests/runtime/test_mpi_cases.py runs every case in-process
on COMM_SELF, and under `mpiexec -n 3` on COMM_WORLD (this file's main):

    mpiexec -n 3 python -m mpi4py tests/runtime/mpi_cases.py

On one rank the conductor is alone (the transport sends to nobody, the group is the
in-process one); on several, every worker must end with what the conductor sent. Collective
clean-ups (closing a group or a broadcast) come after the checks, never in a `finally`: a rank
whose check failed must reach mpi4py's abort, not wait in a collective the others never join.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def tiny_family(comm) -> dict[str, str]:
    """A base and an expert built by rank 0 (in a temp dir every rank sees) and shared."""
    paths = None
    if comm.Get_rank() == 0:
        from cqd_mpi.engines.tiny import build_tiny_llama
        from tests.conftest import perturbed_copy

        root = Path(tempfile.mkdtemp(prefix="cqd-mpi-cases-"))
        base = build_tiny_llama(root / "base", seed=0, hidden_size=16, num_layers=2, num_heads=2)
        expert = perturbed_copy(base, root / "expert", seed=5, scale=0.2)
        paths = {"root": str(root), "base": str(base), "expert": str(expert)}
    return comm.bcast(paths, root=0)


def case_the_broadcast_reaches_engines_with_and_without_receive_buffers(comm) -> None:
    """Round 1: the transformers engine receives into its parameters; round 2: the plug-in
    engine, which has no receive buffer, takes the tensors through load_weights."""
    from cqd_mpi.engines.hf import TransformersEngine
    from cqd_mpi.merging.weights import ModelDir
    from cqd_mpi.runtime.transport import ModelBroadcast, wire_specs
    from tests.engines.plugin_engine import PluginEngine

    family = tiny_family(comm)
    source = ModelDir(family["expert"])
    expected = dict(source.tensors())
    specs = wire_specs(source.layout())
    broadcast = ModelBroadcast(comm, chunk_bytes=4096)
    for engine_class in (TransformersEngine, PluginEngine):
        if comm.Get_rank() == 0:
            broadcast.send(source.tensors())
            continue
        engine = engine_class(family["base"], device="cpu")
        broadcast.receive(engine, specs)
        engine.finish_update()
        live = engine.inner if isinstance(engine, PluginEngine) else engine
        for name, tensor in expected.items():
            got = live.receive_buffer(name)
            assert torch.equal(got, tensor), f"rank {comm.Get_rank()} {engine_class.__name__}: {name} differs"
    broadcast.close()
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(family["root"], ignore_errors=True)


def case_an_eval_group_scores_a_model_as_rank_0_alone_does(comm) -> None:
    """One job through the group this communicator makes (the in-process group on one rank,
    an MPI group of the other ranks otherwise) gives the per-item results rank 0 computes by
    itself."""
    from cqd_mpi.merging.weights import ModelDir
    from cqd_mpi.qd.records import Job, make_splits
    from cqd_mpi.qd.search import STORED
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.run.evaluation import evaluate_chunks, make_chunks
    from cqd_mpi.runtime.groups import InProcessGroup, ModelSource, TimedStream
    from cqd_mpi.runtime.mpi import MPIGroup, worker_loop
    from cqd_mpi.runtime.signals import StopFlag
    from cqd_mpi.runtime.worker import Worker
    from tests.conftest import probe_config

    family = tiny_family(comm)
    root = Path(family["root"])
    config = config_mod.from_dict(probe_config(  # one task: cma-es is the method that takes one
        {"base": family["base"], "experts": {"alpha": family["expert"]}}, root / f"run-{comm.Get_size()}",
        **{"qd.method": "cma-es"}))
    rank = comm.Get_rank()
    if rank > 0:
        worker_loop(comm, Worker(config, rank=rank, world_size=comm.Get_size()), StopFlag())
        return
    reference = Worker(config)
    splits = make_splits({n: t.item_ids() for n, t in reference.tasks.items()}, seed=0)
    chunks = make_chunks(splits, "search", {n: t.batch_size for n, t in reference.tasks.items()})
    reference.load_dir(family["expert"])
    expected = evaluate_chunks(reference.tasks, reference.engine, chunks)

    expert = ModelDir(family["expert"])
    job = Job(model_id=1, generation=0, phase="init", split="search", recipe=STORED)
    if comm.Get_size() == 1:
        group = InProcessGroup(Worker(config))
    else:
        group = MPIGroup(comm, index=0, transport="mpi", stop=StopFlag())
    assert not group.agree_stop()
    group.submit(job, chunks, ModelSource(TimedStream(expert.tensors()), expert.layout()))
    outcome = None
    while outcome is None:
        outcome = group.poll()
    group.close()
    assert outcome.job == job
    assert sorted(outcome.results) == sorted(expected)
    for index, results in expected.items():
        got = outcome.results[index]
        assert [(r.item_id, r.score) for r in got] == [(r.item_id, r.score) for r in results], index
    shutil.rmtree(root, ignore_errors=True)


CASES = [case_the_broadcast_reaches_engines_with_and_without_receive_buffers,
         case_an_eval_group_scores_a_model_as_rank_0_alone_does]


if __name__ == "__main__":
    from mpi4py import MPI

    torch.set_num_threads(1)
    for case in CASES:
        case(MPI.COMM_WORLD)
        MPI.COMM_WORLD.Barrier()
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"{len(CASES)} mpi cases ok on {MPI.COMM_WORLD.Get_size()} ranks")
