"""Times one model's transfer with cqd_mpi's `mpi` transport, nothing else (run under mpiexec).

    mpiexec -n 3 python -m mpi4py benchmarks/transfer_probe.py MODEL_DIR [REPEATS [DEVICE]]

Rank 0 streams the model from its memory-mapped safetensors; every other rank receives it
straight into a live transformers model (cqd_mpi.runtime.transport.ModelBroadcast) on DEVICE
(cpu, or cuda: every worker on cuda:<local rank mod GPUs>). Prints one
line `RESULT {json}` on rank 0 with the bytes and the seconds of each repeat.
"""

import json
import sys
import time

from mpi4py import MPI

from cqd_mpi.merging.weights import ModelDir
from cqd_mpi.runtime.transport import ModelBroadcast, wire_specs

comm = MPI.COMM_WORLD
model_dir = sys.argv[1]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
source = ModelDir(model_dir)
specs = wire_specs(source.layout())
live = None
if comm.rank > 0:
    from cqd_mpi.engines.hf import TransformersEngine

    live = TransformersEngine(model_dir, device="auto" if device == "cuda" else device)
broadcast = ModelBroadcast(comm)
seconds = []
for _ in range(repeats):
    comm.Barrier()
    start = time.perf_counter()
    if comm.rank == 0:
        broadcast.send(ModelDir(model_dir).tensors())
    else:
        broadcast.receive(live, specs)
    comm.Barrier()
    seconds.append(time.perf_counter() - start)
broadcast.close()
if comm.rank == 0:
    print("RESULT " + json.dumps({"bytes": source.nbytes, "seconds": seconds, "ranks": comm.size, "device": device}))
