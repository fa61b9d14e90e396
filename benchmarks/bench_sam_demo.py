"""SAM demo calibration: the demo's whole pipeline for one seed, from an empty cache, timed.

    python benchmarks/bench_sam_demo.py [--seed N] [--generations G] [--work DIR]

Builds cqd_mpi.demo.sam.TrainingRecipe(seed=N) into a fresh cache under --work (a fresh
process, one torch thread), runs `python -m cqd_mpi run` on demo_config(seed=N), and prints
the wall and CPU seconds of both steps with the machine load, the final test-split table,
Table 4 (scores normalised by each expert) and whether the demo's claim holds. Seed 0 is
what `python -m cqd_mpi demo sam` runs. docs/sam.md records the results over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, CPU seconds of the child processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"{command} failed:\n{result.stderr[-3000:]}")
    return result, wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--work", default=str(REPO / ".bench" / "sam-demo"))
    args = parser.parse_args()

    from cqd_mpi.demo import sam as demo

    work = Path(args.work) / f"seed-{args.seed}-{os.getpid()}"
    work.mkdir(parents=True)
    recipe = dataclasses.replace(demo.TrainingRecipe(), seed=args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    code = (f"import dataclasses; from cqd_mpi.demo import sam as demo; "
            f"demo.build(dataclasses.replace(demo.TrainingRecipe(), seed={args.seed}), cache_dir={str(work / 'cache')!r})")
    _, build_wall, build_cpu = timed([sys.executable, "-c", code], env=env)
    models = demo.build(recipe, cache_dir=work / "cache")
    options = {"run_dir": work / "run", "seed": args.seed}
    if args.generations is not None:
        options["generations"] = args.generations
    config = demo.demo_config(models, **options)
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _, run_wall, run_cpu = timed([sys.executable, "-m", "cqd_mpi", "run", str(work / "config.yaml")], env=env)
    load_after = os.getloadavg()

    from cqd_mpi.analysis import normalised
    from cqd_mpi.analysis.runstate import RunState
    from cqd_mpi.run.report import build_report, format_report

    state = RunState.load(work / "run")
    report = build_report(state.core)
    print(f"seed {args.seed}, recipe {recipe.version}, {config['qd']['generations']} generations, "
          f"machine {os.uname().nodename} ({os.cpu_count()} CPUs)")
    print(f"build: wall {build_wall:.0f} s, CPU {build_cpu:.0f} s; run: wall {run_wall:.0f} s, CPU {run_cpu:.0f} s; "
          f"total wall {build_wall + run_wall:.0f} s; load average "
          f"{' '.join(f'{x:.1f}' for x in load_before)} -> {' '.join(f'{x:.1f}' for x in load_after)}")
    print(format_report(report))
    print("\n".join(normalised.section(state, report)))
    return 0 if normalised.claim(report)[0] else 1


if __name__ == "__main__":
    sys.exit(main())
