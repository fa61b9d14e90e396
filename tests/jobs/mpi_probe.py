"""Run by tests/jobs/test_multinode.py under `srun --mpi=pmi2` on the multi-node cluster: each
rank reports where it runs, the device a worker would take, and the bytes its node's network
interface moved while rank 0 broadcast PAYLOAD bytes (one JSON line, printed by rank 0).

The nodes have no GPUs: the device is what cqd_mpi.engines.devices.resolve_device("auto")
gives from this rank's launcher environment on a node of CQD_PROBE_GPUS GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from cqd_mpi.engines import devices

PAYLOAD = 16 * 2**20


def eth0_bytes() -> tuple[int, int]:
    """(received, sent) bytes of this network namespace's eth0 (the node's link), from /proc/net/dev."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "eth0":
            fields = counters.split()
            return int(fields[0]), int(fields[8])
    return 0, 0


def main() -> None:
    gpus = int(os.environ.get("CQD_PROBE_GPUS", "2"))
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: gpus
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    before = eth0_bytes()  # on every rank before any rank may send (a late reader missed bytes)
    comm.Barrier()
    data = np.full(PAYLOAD, 7 if comm.Get_rank() == 0 else 0, dtype=np.uint8)
    comm.Bcast(data, root=0)
    comm.Barrier()
    after = eth0_bytes()
    report = {"rank": comm.Get_rank(), "host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
              "local_rank": devices.local_rank(), "device": str(devices.resolve_device("auto")),
              "node_ranks": node.Get_size(), "received": after[0] - before[0], "sent": after[1] - before[1],
              "payload_ok": bool((data == 7).all())}
    reports = comm.gather(report, root=0)
    if comm.Get_rank() == 0:
        print(json.dumps({"library": MPI.Get_library_version().splitlines()[0], "payload": PAYLOAD,
                          "ranks": reports}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
