"""A live MPI job on this node that records its shared-memory segments as cqd_mpi's ranks do,
prints them (rank 0) and holds them until its stdin closes: what another job's sweep must spare."""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpi4py import MPI  # noqa: E402

from cqd_mpi.runtime import shm  # noqa: E402

shm.record()
comm = MPI.COMM_WORLD
if comm.Get_rank() == 0:
    print(" ".join(sorted(shm.mapped_segments())), flush=True)
    sys.stdin.read()
done = comm.Ibarrier()
while not done.Test():
    time.sleep(0.05)
