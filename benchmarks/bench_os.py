"""OS task harness benchmark: environment start latency, and items/s per worker with the reference solutions.

    python benchmarks/bench_os.py DATA [--backends bwrap docker] [--starts 20] [--parallel 1 4]
                                       [--docker-host unix:///tmp/podman.sock]

DATA is AgentBench's data/os_interaction dir (the standard set) or one of its problem files
(the dev set: data/os_interaction/data/dev.json). For each back-end:
- start latency: `--starts` environments of the default image, one after the other: the
  time to a ready environment, to a ready shell, one `echo` through that shell, and close;
- items/s: OSInteractionTask.reference_results over every item (the examples, or an echo of
  the answer, run in the item's shell; then the checks), as one worker with `parallel`
  environments at once. No model is involved.

Prints markdown tables ready to paste, with the machine load next to them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} (1 / 5 min) on {os.cpu_count()} CPUs"


def make_task(data: Path, backend: str, parallel: int, docker_host: str | None):
    from cqd_mpi import schema
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.os_interaction import OSInteractionTask, Settings

    environment = {"backend": backend}
    if docker_host:
        environment["docker_host"] = docker_host
    settings = schema.build(Settings, {"environment": environment, "parallel": parallel}, "settings")
    return OSInteractionTask(name="os", data=str(data), settings=settings, context=TaskContext())


def starts(task, count: int) -> dict[str, list[float]]:
    item = next(iter(task.items.values()))
    task.open_environment(item).close()
    phases: dict[str, list[float]] = {"environment": [], "shell": [], "command": [], "close": []}
    for _ in range(count):
        begin = time.perf_counter()
        env = task.open_environment(item)
        ready = time.perf_counter()
        shell = env.shell()
        shelled = time.perf_counter()
        assert shell.run("echo ready").text == "ready\r\n"
        ran = time.perf_counter()
        env.close()
        closed = time.perf_counter()
        for name, seconds in zip(phases, (ready - begin, shelled - ready, ran - shelled, closed - ran)):
            phases[name].append(seconds * 1000)
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--backends", nargs="+", default=["bwrap", "docker"], choices=("bwrap", "docker"))
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST"))
    args = parser.parse_args()

    before = load_note()
    latency, rates = [], []
    for backend in args.backends:
        with make_task(args.data, backend, 1, args.docker_host) as task:
            phases = starts(task, args.starts)
        row = " | ".join(f"{statistics.median(v):.0f} / {max(v):.0f}" for v in phases.values())
        latency.append(f"| {backend} | {args.starts} | {row} |")
        for parallel in args.parallel:
            with make_task(args.data, backend, parallel, args.docker_host) as task:
                ids = task.item_ids()
                begin = time.perf_counter()
                results = task.reference_results(ids)
                wall = time.perf_counter() - begin
            passed = sum(r.score for r in results)
            rates.append(f"| {backend} | {parallel} | {len(ids)} | {wall:.1f} | {len(ids) / wall:.2f} | "
                         f"{passed:.0f} ({passed / len(ids):.3f}) |")
    print(f"OS harness on {args.data}; {before} before, {load_note()} after\n")
    print("| back-end | starts | environment ms (median / max) | shell ms | echo ms | close ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(latency))
    print("\n| back-end | environments at once | items | seconds | items/s per worker | passed (ceiling) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
