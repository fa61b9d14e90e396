"""Weights verification benchmark (run/integrity.py): what checking the base, the experts and
a saved child costs at the 0.85B size of bench_merge, and at 8B by arithmetic.

    python benchmarks/bench_integrity.py [--work DIR] [--repeat 3]

Builds (or reuses, under --work as bench_merge does) bench_merge's 0.85B bf16 base, sharded at
1 GB, then times, page cache warm, best of --repeat:

- `check_inputs` on it: the sha256 of each file, what every start and resume pays per model;
- `weights_digest`: the tensor digest of a child, paid at its save (as before) and, by the
  store, the first time a process reads it;
- `FileKeys.current`: the check of every later read (a stat per file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PAPER_MODEL_BYTES = 16.06e9
"""Llama-3-8B in bf16 (8.03B parameters)."""


def best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "merge")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from bench_merge import build_models, machine

    from cqd_mpi.merging.weights import ModelDir
    from cqd_mpi.run.integrity import FileKeys, check_inputs, weights_digest

    base = build_models(args.work)["base"]
    size = ModelDir(base).nbytes
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    check_inputs({"base": base}, None, holder="-")  # warm the page cache
    files_s = best(args.repeat, lambda: check_inputs({"base": base}, None, holder="-"))
    tensors_s = best(args.repeat, lambda: weights_digest(base))
    keys = FileKeys()
    keys.remember(0, keys.of(base))
    n = 1000
    stat_s = best(args.repeat, lambda: [keys.current(0, base) for _ in range(n)]) / n
    scale = PAPER_MODEL_BYTES / size
    print(f"Machine: {machine()}; load {load} before, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    print(f"Model: {size / 1e9:.2f} GB of weights in {len(ModelDir(base).files)} shards\n")
    print(f"| check | when | 0.85B s | GB/s | 8B s (x {scale:.2f}) |")
    print("|---|---|---|---|---|")
    print(f"| sha256 of the files (`check_inputs`) | every start and resume, per base/expert | {files_s:.2f} | "
          f"{size / files_s / 1e9:.2f} | {files_s * scale:.1f} |")
    print(f"| tensor digest (`weights_digest`) | a child's save; its first read in a process | {tensors_s:.2f} | "
          f"{size / tensors_s / 1e9:.2f} | {tensors_s * scale:.1f} |")
    print(f"| stat keys (`FileKeys.current`) | every later read of a child | {stat_s * 1e6:.1f} us | - | "
          f"{stat_s * 1e6:.1f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
