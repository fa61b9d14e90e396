"""Run under mpiexec by test_transport.py: one bf16 tensor of more than 2^31 bytes through
ModelBroadcast, then a small one; every worker checks the SHA-256 of what it received.

    mpiexec -n N python tests/runtime/large_transport_check.py ELEMENTS
"""

import hashlib
import sys

import torch
from mpi4py import MPI

from cqd_mpi.runtime.transport import ModelBroadcast, byte_view


class Slots:
    """The part of an engine the transport touches: one receive buffer per name."""

    def __init__(self, tensors):
        self.tensors = tensors

    def required_names(self):
        return list(self.tensors)

    def receive_buffer(self, name):
        return self.tensors[name]


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(byte_view(tensor)).hexdigest()


elements = int(sys.argv[1])
comm = MPI.COMM_WORLD
specs = [("huge", (elements,), "bfloat16"), ("small", (1000,), "bfloat16")]
broadcast = ModelBroadcast(comm)
if comm.rank == 0:
    generator = torch.Generator().manual_seed(5)
    sent = {name: torch.randint(-32768, 32767, shape, dtype=torch.int16, generator=generator)
            .view(torch.bfloat16) for name, shape, _ in specs}
    expected = {name: digest(tensor) for name, tensor in sent.items()}
    broadcast.send(sent.items())
    del sent
else:
    live = Slots({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape, _ in specs})
    broadcast.receive(live, specs)
    expected = None
expected = comm.bcast(expected, root=0)
if comm.rank:
    for name, tensor in live.tensors.items():
        assert digest(tensor) == expected[name], f"rank {comm.rank}: {name} differs"
broadcast.close()
ok = comm.gather(True, root=0)
if comm.rank == 0:
    print(f"large transport ok on {len(ok)} ranks")
