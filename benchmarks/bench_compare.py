"""The paper's comparisons on the demo's skills: every trial over seeds, one kill -9 each, then `compare`.

    python benchmarks/bench_compare.py [--work DIR] [--generations 40] [--seeds 0 1 2] [--population 5] [--items N]

With the demo's tiny models (built once, cached), writes the demo config with the given
budget, the configs of Table 2's five trials and Table 1's CMA-ES and NSGA-II for every seed
(`python -m cqd_mpi trials`), and runs each. For each trial, one more run of the first seed
is killed with kill -9 in the middle of its search (CQD_MPI_FAULT=eval:kill:N) and resumed,
and its state.h5 is checked against the uninterrupted run's (everything but timings and the
launch attributes). Then `python -m cqd_mpi compare` over all runs prints the table (markdown,
and json next to it) and writes the bar chart. Prints a log of each run's wall time.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUN_ATTRS = ("world_size", "config", "package_version")
TIMINGS = ("merge_s", "transfer_s", "eval_s", "total_s")


def cli(*args, env=None) -> subprocess.CompletedProcess:
    import os

    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "cqd_mpi", *map(str, args)], env=environment,
                          capture_output=True, text=True)


def comparable(run_dir: Path) -> dict:
    from cqd_mpi.run.state import read_state

    tree = read_state(run_dir / "state.h5")
    for key in TIMINGS:
        tree["history"].pop(key)
    for key in RUN_ATTRS:
        tree["attrs"].pop(key)
    return tree


def differences(a, b, path="/") -> list[str]:
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{path}{key}/")]
    if isinstance(a, np.ndarray):
        same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        return [] if same else [path]
    return [] if a == b else [path]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "compare")
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=5)
    parser.add_argument("--items", type=int, default=None,
                        help="items per skill (default: the demo's 300); fewer items are the first ones "
                        "of the demo's, so still never trained on")
    args = parser.parse_args()

    from cqd_mpi.demo import llm as demo

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = demo.build()
    config = demo.demo_config(models, run_dir=work / "unused", generations=args.generations)
    config["qd"]["coefficients"] = {"population": args.population, "sigma0": 0.1, "lower": 0.0, "upper": 1.0}
    if args.items is not None:
        for task in config["tasks"]:
            task["settings"]["n_items"] = task["batch_size"] = args.items
    base = work / "config.yaml"
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    listed = cli("trials", base, "--seeds", *args.seeds, "--out", work / "runs")
    if listed.returncode:
        print(listed.stderr, file=sys.stderr)
        return 1
    configs = [Path(line) for line in listed.stdout.split()]
    log = []
    for path in configs:
        run_dir = Path(yaml.safe_load(path.read_text())["runtime"]["run_dir"])
        if (run_dir / "final" / "report.json").exists():
            log.append(f"{path.stem}: already done")
            continue
        started = time.perf_counter()
        result = cli("run", path)
        line = f"{path.stem}: exit {result.returncode} in {time.perf_counter() - started:.0f} s"
        print(line, flush=True)
        log.append(line)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1

    first = f"seed{args.seeds[0]}"
    kill_at = 4 + args.generations // 2
    for path in configs:
        if not path.stem.endswith(first):
            continue
        data = yaml.safe_load(path.read_text())
        killed_dir = work / "killed" / path.stem
        data["runtime"]["run_dir"] = str(killed_dir)
        killed_config = work / "killed" / f"{path.stem}.yaml"
        killed_config.parent.mkdir(parents=True, exist_ok=True)
        killed_config.write_text(yaml.safe_dump(data, sort_keys=False))
        if not (killed_dir / "final" / "report.json").exists():
            started = time.perf_counter()
            killed = cli("run", killed_config, env={"CQD_MPI_FAULT": f"eval:kill:{kill_at}"})
            if killed.returncode != -signal.SIGKILL:
                print(f"{path.stem}: expected a kill -9, got exit {killed.returncode}\n{killed.stderr[-2000:]}")
                return 1
            resumed = cli("run", killed_config)
            if resumed.returncode or "resuming" not in resumed.stdout:
                print(f"{path.stem}: resume failed (exit {resumed.returncode})\n{resumed.stderr[-2000:]}")
                return 1
            seconds = time.perf_counter() - started
        else:
            seconds = float("nan")
        reference = Path(yaml.safe_load(path.read_text())["runtime"]["run_dir"])
        wrong = differences(comparable(reference), comparable(killed_dir))
        line = (f"{path.stem}: killed with kill -9 at evaluation {kill_at}, resumed "
                f"({seconds:.0f} s): state {'identical to' if not wrong else 'DIFFERENT from'} the uninterrupted run"
                + (f" at {wrong[:5]}" if wrong else ""))
        print(line, flush=True)
        log.append(line)
        if wrong:
            return 1

    run_dirs = [Path(yaml.safe_load(p.read_text())["runtime"]["run_dir"]) for p in configs]
    table = cli("compare", *run_dirs, "--chart", work / "comparison.png")
    as_json = cli("compare", *run_dirs, "--format", "json", "--no-chart")
    (work / "comparison.json").write_text(as_json.stdout)
    (work / "comparison.md").write_text(table.stdout)
    (work / "log.txt").write_text("\n".join(log) + "\n")
    print(table.stdout)
    print(json.dumps({"generations": args.generations, "seeds": args.seeds, "population": args.population}))
    return table.returncode


if __name__ == "__main__":
    sys.exit(main())
