"""Ending a job from one rank: every rank aborts (MPI_Abort) or, alone, the process exits.

Below runtime/mpi.py and runtime/deadline.py, which both end jobs, so neither imports the other.
"""

from __future__ import annotations

import os
import sys
import time

from cqd_mpi.runtime import shm

ABORT_GRACE_S = 1.0


def abort(comm, status: int = 1) -> None:
    """End every rank of the job (an exception on one rank must not hang the others).

    The launcher stops forwarding a rank's output once it hears of the abort, so lines still
    in the pipe would be lost: flush, then give it ABORT_GRACE_S to forward them first. The
    job's shared-memory segments are unlinked first, as MPI_Abort leaves them (runtime/shm.py).
    """
    try:
        shm.release()
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
    finally:
        comm.Abort(status)


def end_job(status: int) -> None:
    """Abort every rank under MPI, else exit this process at once (the main thread may be stuck)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        abort(mpi.COMM_WORLD, status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
