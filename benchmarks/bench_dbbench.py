"""dbbench harness benchmark: items/s with oracle answers, with 1 and 4 concurrent clients.

    python benchmarks/bench_dbbench.py [--dsn mysql://root@127.0.0.1:3306] [--passes 2]
                                       [--clients 1 4] [--parallel 4] [--backend external]

Each client is a separate process (as MPI workers are) holding one DBBenchTask on the shared
server; it plays the AgentBench sample's items `--passes` times with the oracle answers
(DBBenchTask.reference_results: INSERT/UPDATE items execute their label and are hashed,
SELECT items answer their label), so every item creates its database and user, loads its
table, runs its rounds and is dropped. No model is involved. Clients start together behind a
barrier; items/s is all clients' items over the wall time of the slowest.

Prints a markdown table ready to paste, with the machine load next to it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "fixtures" / "dbbench" / "dev.jsonl"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} (1 / 5 min) on {os.cpu_count()} CPUs"


def client(rank: int, args: argparse.Namespace, barrier, results) -> None:
    from cqd_mpi import schema
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.dbbench import DBBenchTask, Settings

    server = {"backend": args.backend}
    if args.backend == "external":
        server["dsn"] = args.dsn
    settings = schema.build(Settings, {"server": server, "parallel": args.parallel}, "settings")
    with DBBenchTask(name="dbbench", data=str(args.data), settings=settings,
                     context=TaskContext(rank=rank, world_size=args.clients_now)) as task:
        ids = task.item_ids()
        task.reference_results(ids[:2])
        barrier.wait(timeout=600)
        start = time.perf_counter()
        scores = []
        for _ in range(args.passes):
            scores += [r.score for r in task.reference_results(ids)]
        results.put((rank, start, time.perf_counter(), len(scores), sum(scores), task.server.version))


def run(clients: int, args: argparse.Namespace) -> tuple[float, float, int, float, str]:
    import queue

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    results = context.Queue()
    args.clients_now = clients
    processes = [context.Process(target=client, args=(rank, args, barrier, results)) for rank in range(clients)]
    for process in processes:
        process.start()
    reports = []
    try:
        while len(reports) < clients:
            try:
                reports.append(results.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    raise SystemExit(f"a client exited with status {failed[0]}; see its traceback above") from None
    finally:
        for process in processes:
            if len(reports) < clients:
                process.terminate()
            process.join()
    wall = max(r[2] for r in reports) - min(r[1] for r in reports)
    items = sum(r[3] for r in reports)
    correct = sum(r[4] for r in reports)
    per_client = sum(r[3] / (r[2] - r[1]) for r in reports) / clients
    return items / wall, per_client, items, correct / items, reports[0][5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306"))
    parser.add_argument("--backend", choices=("external", "local", "docker"), default="external",
                        help="local/docker start one server per client")
    parser.add_argument("--data", type=Path, default=FIXTURE)
    parser.add_argument("--passes", type=int, default=2, help="passes over the sample per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--parallel", type=int, default=4, help="threads per client (settings.parallel)")
    args = parser.parse_args()

    before = load_note()
    rows = []
    for clients in args.clients:
        rate, per_client, items, accuracy, version = run(clients, args)
        rows.append(f"| {clients} | {args.parallel} | {items} | {rate:.1f} | {per_client:.1f} | {accuracy:.0%} |")
    print(f"dbbench harness, oracle answers, {args.backend} server {version}; {before} before, {load_note()} after\n")
    print("| clients | threads/client | items | items/s (all clients) | items/s per client | oracle accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
