"""Run under mpiexec by test_transport.py: send a model with ModelBroadcast, check every rank got it.

    mpiexec -n N python tests/runtime/transport_check.py SOURCE_DIR LIVE_DIR LIVE_DTYPE CHUNK_BYTES [DEVICE]

With DEVICE cuda the workers receive straight into CUDA parameters.
"""

import sys

import torch
from mpi4py import MPI

from cqd_mpi.engines.hf import TransformersEngine
from cqd_mpi.merging.weights import ModelDir
from cqd_mpi.runtime.transport import ModelBroadcast, wire_specs

source_dir, live_dir, live_dtype, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
comm = MPI.COMM_WORLD
source = ModelDir(source_dir)
specs = wire_specs(source.layout())
broadcast = ModelBroadcast(comm, chunk_bytes=chunk)
live = None if comm.rank == 0 else TransformersEngine(live_dir, device=device, dtype=live_dtype)
for _ in range(2):
    if comm.rank == 0:
        broadcast.send(source.tensors())
    else:
        broadcast.receive(live, specs)
        for name, tensor in source.tensors():
            got = live.receive_buffer(name)
            assert got.dtype == getattr(torch, live_dtype), (name, got.dtype)
            assert got.device.type == device, (name, got.device)
            assert torch.equal(got.cpu(), tensor.to(got.dtype)), f"rank {comm.rank}: {name} differs"
broadcast.close()
ok = comm.gather(True, root=0)
if comm.rank == 0:
    print(f"transport ok on {len(ok)} ranks")
