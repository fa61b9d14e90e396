"""Analysis benchmark: `analyze` on a paper-sized state.h5 (K tasks, 15 bins, 1200 generations).

    python benchmarks/bench_analyze.py [--generations N] [--tasks K] [--items N] [--work DIR]

Builds a state file the way a run does (the CycleQD core's ask/tell loop, HDF5 backend),
with synthetic seeded scores that improve over generations and synthetic timings, then
measures, in this process: reading the state (RunState.load), replaying every generation
(progress curves), the text summary, and rendering each figure. No model weights are
involved: analysis reads only state.h5. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cqd_mpi.analysis.plots import (  # noqa: E402
    elite_map_strip,
    elite_maps,
    progress_curves,
    strip_generations,
    time_breakdown,
)
from cqd_mpi.analysis.runstate import RunState, summary  # noqa: E402
from cqd_mpi.qd.cycleqd import CycleQD  # noqa: E402
from cqd_mpi.qd.params import SearchParams  # noqa: E402
from cqd_mpi.qd.records import make_splits  # noqa: E402
from cqd_mpi.qd.search import Search  # noqa: E402
from cqd_mpi.run.state import HDF5Backend  # noqa: E402

TASKS = ("coding", "os", "db", "vqa", "seg")


def build_state(run_dir: Path, *, k: int, generations: int, items: int, seed: int = 0) -> None:
    names = TASKS[:k]
    splits = make_splits({n: [f"{n}-{i}" for i in range(2 * items)] for n in names}, seed=seed)
    core = Search(params=SearchParams(generations=generations, seed=seed, n_bins=15), strategy=CycleQD(),
                  task_names=names, base_path="/models/base", expert_paths=[f"/models/{n}" for n in names],
                  splits=splits)
    rng = np.random.default_rng(seed)
    while not core.done:
        job = core.ask()
        skill = min(1.0, 0.35 + 0.25 * job.generation / max(1, generations))
        scores = np.clip(rng.normal(skill, 0.08, size=k), 0.0, 1.0)
        item_scores = {n: (rng.random(len(splits[n].ids(job.split))) < s).astype(np.float32)
                       for n, s in zip(names, scores)}
        timings = None
        if job.phase == "search":
            merge, transfer, evaluate = rng.uniform(8, 12), rng.uniform(1, 2), rng.uniform(200, 260)
            timings = {"merge": merge, "transfer": transfer, "eval": evaluate,
                       "total": merge + transfer + evaluate + rng.uniform(1, 3)}
        core.tell(job.model_id, scores, item_scores=item_scores, timings=timings)
    run_dir.mkdir(parents=True, exist_ok=True)
    HDF5Backend(run_dir / "state.h5").save(core, attrs={"config": "", "world_size": 8})


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=1200)
    parser.add_argument("--tasks", type=int, default=3, choices=range(2, len(TASKS) + 1))
    parser.add_argument("--items", type=int, default=200, help="items per task and split")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    run_dir = work / "run"
    _, build_s = timed(lambda: build_state(run_dir, k=args.tasks, generations=args.generations, items=args.items))
    size_mb = (run_dir / "state.h5").stat().st_size / 1e6
    rows = []
    run, seconds = timed(lambda: RunState.load(run_dir))
    rows.append(("read state.h5 (RunState.load)", seconds))
    _, seconds = timed(lambda: run.progress())
    rows.append((f"replay {args.generations} generations (progress)", seconds))
    _, seconds = timed(lambda: summary(run))
    rows.append(("text summary (with lineage)", seconds))
    last = run.generations_done
    snapshots, seconds = timed(lambda: run.archives_at(strip_generations(last)))
    rows.append(("archives at 5 generations", seconds))
    out = work / "plots"
    for label, draw in (
        ("elite_maps.png", lambda: elite_maps(run, snapshots[last], last, out / "elite_maps.png")),
        ("elite_maps_over_generations.png", lambda: elite_map_strip(run, snapshots, out / "strip.png")),
        ("progress.png", lambda: progress_curves(run, last, out / "progress.png")),
        ("time_breakdown.png", lambda: time_breakdown(run, last, out / "time.png")),
    ):
        _, seconds = timed(draw)
        rows.append((f"render {label}", seconds))
    load = os.getloadavg()[0]
    print(f"analysis of a K={args.tasks} run, {args.generations} generations, 15 bins, {args.items} items "
          f"per task and split; state.h5 {size_mb:.1f} MB (built in {build_s:.1f} s); "
          f"load average {load:.2f} on {os.cpu_count()} CPUs")
    print()
    print("| step | seconds |")
    print("| --- | ---: |")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    print(f"| **total** | **{sum(s for _, s in rows):.3f}** |")


if __name__ == "__main__":
    main()
