"""The rank-64 randomized SVD + update per matrix shape of the 0.85B model, with its skinny
QRs and small SVDs on one thread against all of torch's threads (the `_lapack_threads`
choice), side by side in one process.

    python benchmarks/lapack_threads_probe.py [RANK]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cqd_mpi.merging import operators

COUNTS = {(2048, 2048): 32, (512, 2048): 32, (5632, 2048): 32, (2048, 5632): 16, (32000, 2048): 2}


def mutation_time(tau: torch.Tensor, rank: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        target = tau.clone()
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        u, s, v = operators.randomized_svd(target, rank, niter=2, generator=generator)
        operators.add_scaled_components(target, u, s, v, torch.full_like(s, 0.1))
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rank", type=int, nargs="?", default=64)
    rank = parser.parse_args().rank
    threads = torch.get_num_threads()
    serial = operators._one_thread
    totals = {"one thread": 0.0, f"{threads} threads": 0.0}
    for shape, count in COUNTS.items():
        tau = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.002
        cells = []
        for label, context in (("one thread", serial), (f"{threads} threads", contextlib.nullcontext)):
            operators._lapack_threads = context
            seconds = mutation_time(tau, rank)
            totals[label] += seconds * count
            cells.append(f"{label} {seconds * 1e3:.1f} ms")
        print(f"{shape[0]}x{shape[1]} x{count}: " + ", ".join(cells))
    print("model total (one matrix per shape x count): "
          + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
