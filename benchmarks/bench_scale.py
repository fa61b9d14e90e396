"""Scale by simulation: how rank 0's cost per generation grows with workers and eval groups.

    python benchmarks/bench_scale.py [--work DIR] [--workers 2 4 8 16] [--groups 1 2 4] [--generations N]

The conductor runs with a null evaluator (benchmarks/null_task.py: scores without running the
model) over W worker ranks in G eval groups (runtime.pipeline_depth G - 1, so that G children
are in flight), all under `mpiexec -n W+1` on this machine: oversubscribed, as many ranks as it
holds. The model is the tests' tiny Llama (hidden 32), so merging and sending it cost next to
nothing and what is left is the conductor's own cost per child: the stop agreement and header
per group, the scatter of chunks, gathering and telling results, archive updates, checkpoints.
From each run: wall seconds per generation (search phase), and from /history the per-child
transfer and the time beyond merge + transfer + eval ("other": rank 0's bookkeeping).
Prints a markdown table for docs/benchmarks.md, with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_merge import machine  # noqa: E402


def family(root: Path) -> dict[str, Path]:
    """The tests' tiny Llama base and two experts (base + seeded noise), built once."""
    from cqd_mpi.engines.tiny import build_tiny_llama
    from tests.conftest import perturbed_copy

    base = root / "base"
    if not (base / "config.json").exists():
        build_tiny_llama(base, seed=0, hidden_size=32, num_layers=2, num_heads=2)
    models = {"base": base}
    for i, name in enumerate(("a", "b")):
        path = root / f"expert-{name}"
        if not (path / "config.json").exists():
            perturbed_copy(base, path, seed=i + 1, scale=0.25)
        models[name] = path
    return models


def run_one(work: Path, models: dict[str, Path], workers: int, groups: int, generations: int,
            items: int) -> dict:
    name = f"w{workers}-g{groups}"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "base": str(models["base"]),
        "experts": [{"task": t, "path": str(models[t])} for t in ("a", "b")],
        "tasks": [{"name": t, "kind": "null_task:NullTask", "settings": {"n_items": items}, "batch_size": 4}
                  for t in ("a", "b")],
        "qd": {"generations": generations, "mutation": {"kind": "none"}},
        "runtime": {"run_dir": str(run_dir), "eval_groups": groups, "pipeline_depth": groups - 1, "threads": 1},
        "engine": {"device": "cpu", "settings": {"batch_size": 8}},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    started = time.perf_counter()
    result = subprocess.run([shutil.which("mpiexec"), "-n", str(workers + 1), sys.executable, "-m", "cqd_mpi",
                             "run", str(path)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {work / f'{name}.log'}")
    from cqd_mpi.run.state import read_state

    state = read_state(run_dir / "state.h5")
    h = {k: np.asarray(state["history"][k]) for k in ("merge_s", "transfer_s", "eval_s", "total_s")}
    gens = [float(m.group(1)) for m in re.finditer(r"^gen +\d+/\d+ .* ([\d.]+)s$", result.stdout, re.M)]
    per_gen = np.diff(gens).mean() if len(gens) > 1 else float("nan")
    other = h["total_s"] - h["merge_s"] - h["transfer_s"] - h["eval_s"]
    return {"workers": workers, "groups": groups, "wall": wall, "per_gen": per_gen,
            "transfer": float(np.median(h["transfer_s"])), "eval": float(np.median(h["eval_s"])),
            "other": float(np.median(other)), "children": len(gens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "scale")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--items", type=int, default=32, help="items per task (chunks of 4)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = family(work / "family")
    load_before = os.getloadavg()
    rows = []
    for workers in args.workers:
        for groups in args.groups:
            if groups <= workers:
                rows.append(run_one(work, models, workers, groups, args.generations, args.items))
                print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}; load average before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| workers (ranks) | eval groups | s per generation | per child: transfer s | eval s | "
          "rank 0 other s | run wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} ({r['workers'] + 1}) | {r['groups']} | {r['per_gen']:.3f} | {r['transfer']:.3f} | "
              f"{r['eval']:.3f} | {r['other']:.3f} | {r['wall']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
