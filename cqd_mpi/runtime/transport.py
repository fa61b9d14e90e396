"""Transport `mpi`: moving a model from rank 0 into the live models of a group's workers.

Within a node, bytes go through an MPI-3 shared-memory window: the node's leader writes
each chunk once and every worker on the node copies it straight into its live model, so a
model is copied once per worker (plus once on the conductor's side), which is what a plain
memory copy per worker costs. Between nodes, the node leaders receive each chunk with
MPI_Bcast straight into their own window. The window has two slots of `chunk_bytes`; one
barrier per chunk on each node lets the leader fill one slot while the workers read the
other. Chunks are bounded, so no count ever reaches 2^31 and nobody holds a second copy of
the model; tensors of any dtype travel as raw bytes (bf16 included) and are cast on arrival
when the live model uses another dtype.

CQD_MPI_RANKS_PER_NODE=N treats every N consecutive ranks as one node (to exercise the
inter-node path on a single machine).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

CHUNK_BYTES = 8 * 2**20


def wire_specs(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[str, tuple[int, ...], str]]:
    """A layout (name -> shape, dtype) as picklable (name, shape, dtype name) triples, the form
    that goes to the workers in a job's header and that `ModelBroadcast.receive` reads."""
    return [(name, tuple(shape), str(dtype).removeprefix("torch.")) for name, (shape, dtype) in layout.items()]


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor, without a copy (bf16 too)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


class ModelBroadcast:
    """Collective over one group communicator whose rank 0 is the conductor."""

    def __init__(self, comm, *, chunk_bytes: int = CHUNK_BYTES):
        from mpi4py import MPI

        if chunk_bytes % 8:
            raise ValueError(f"chunk_bytes must be a multiple of 8, got {chunk_bytes}")
        self.comm = comm
        self.chunk_bytes = chunk_bytes
        rank = comm.Get_rank()
        per_node = os.environ.get("CQD_MPI_RANKS_PER_NODE")
        if per_node:
            self.node = comm.Split(MPI.COMM_WORLD.Get_rank() // int(per_node), key=rank)
        else:
            self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        self.is_leader = self.node.Get_rank() == 0
        self.leaders = comm.Split(0 if self.is_leader else MPI.UNDEFINED, key=rank)
        self._between_nodes = self.leaders != MPI.COMM_NULL and self.leaders.Get_size() > 1
        self.window = MPI.Win.Allocate_shared(2 * chunk_bytes if self.is_leader else 0, 1, comm=self.node)
        memory, _ = self.window.Shared_query(0)
        self.slots = np.frombuffer(memory, dtype=np.uint8, count=2 * chunk_bytes).reshape(2, chunk_bytes)
        self._chunk = 0

    def _next_slot(self, size: int) -> np.ndarray:
        slot = self.slots[self._chunk % 2, :size]
        self._chunk += 1
        return slot

    def _spread(self, slot: np.ndarray) -> None:
        """Root has filled `slot`: node leaders receive it, then each node's members may read it."""
        if self._between_nodes:
            from mpi4py import MPI

            self.leaders.Bcast([slot, MPI.BYTE], root=0)
        self.node.Barrier()

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Rank 0: send every tensor, in the order of the specs the workers were given."""
        for _name, tensor in tensors:
            data = byte_view(tensor)
            for start in range(0, data.size, self.chunk_bytes):
                piece = data[start:start + self.chunk_bytes]
                slot = self._next_slot(piece.size)
                np.copyto(slot, piece)
                self._spread(slot)

    def receive(self, engine, specs: Sequence[tuple[str, tuple[int, ...], str]]) -> None:
        """A worker: receive the tensors named in `specs` into the engine.

        A tensor the engine has a receive buffer for is written straight into it, chunk by
        chunk; the others are assembled one at a time and handed to `engine.load_weights` as
        they arrive, so no more than one tensor is ever held outside the engine.
        """
        names = {name for name, _, _ in specs}
        missing = [n for n in engine.required_names() if n not in names]
        if missing:
            raise RuntimeError(f"the conductor's model lacks {len(missing)} tensor(s) the engine needs, "
                               f"e.g. {', '.join(missing[:3])}")
        unbuffered = self._receive_buffered(engine, specs)
        first = next(unbuffered, None)
        if first is not None:
            engine.load_weights(itertools.chain([first], unbuffered))
            for _ in unbuffered:
                raise RuntimeError("the engine's load_weights returned before it took every tensor")

    def _receive_buffered(self, engine, specs) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive every tensor in spec order: into its receive buffer when the engine has one,
        else into a new tensor that is yielded."""
        for name, shape, dtype_name in specs:
            dtype = getattr(torch, dtype_name)
            target = engine.receive_buffer(name)
            if target is None:
                tensor = torch.empty(tuple(shape), dtype=dtype)
                self._receive_into(tensor, dtype)
                yield name, tensor
                continue
            if tuple(target.shape) != tuple(shape):
                raise RuntimeError(f"tensor {name}: the sender has shape {tuple(shape)}, "
                                   f"the live model {tuple(target.shape)}")
            self._receive_into(target, dtype)

    def _receive_into(self, target: torch.Tensor, dtype: torch.dtype) -> None:
        """Fill `target` with the next tensor's bytes, sent as `dtype` (cast when it differs)."""
        itemsize = dtype.itemsize
        nbytes = target.numel() * itemsize
        flat = target.data.view(-1)
        direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        for start in range(0, nbytes, self.chunk_bytes):
            slot = self._next_slot(min(self.chunk_bytes, nbytes - start))
            self._spread(slot)
            if direct:
                np.copyto(byte_view(flat)[start:start + slot.size], slot)
            else:
                piece = torch.from_numpy(slot).view(dtype)
                flat[start // itemsize:(start + slot.size) // itemsize].copy_(piece)

    def close(self) -> None:
        from mpi4py import MPI

        self.window.Free()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
        self.node.Free()
