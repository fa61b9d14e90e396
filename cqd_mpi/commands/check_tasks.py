"""`python -m cqd_mpi check-tasks CONFIG`: replay every task's reference solutions through its harness."""

from __future__ import annotations

import time

HELP = "replay each task's reference solutions through the evaluation harness and print its ceiling"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the run's YAML config, or one with only tasks (and protocol, engine)")
    parser.add_argument("--task", action="append", help="only this task (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    parser.add_argument("--show-failures", type=int, default=5, help="list up to this many failing items per task")


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from cqd_mpi.errors import ConfigError
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.run.evaluation import isolated_results
    from cqd_mpi.runtime.worker import build_tasks

    config = config_mod.load(args.config, tasks_only=True)
    unknown = sorted(set(args.task or []) - set(config.task_names))
    if unknown:
        raise ConfigError(f"--task: unknown task {', '.join(unknown)}; the config has {', '.join(config.task_names)}")
    with tempfile.TemporaryDirectory(prefix="cqd-check-") as scratch:
        tasks = build_tasks(config, work_root=Path(scratch))
        incomplete = False
        protocol = {t.name: t.protocol or "-" for t in config.tasks}
        print(f"{'task':<16}{'kind':<12}{'protocol':<11}{'items':>7}{'ceiling':>9}{'errors':>8}{'seconds':>9}")
        try:
            for name, task in tasks.items():
                if args.task and name not in args.task:
                    continue
                ids = task.item_ids()[: args.limit]
                start = time.perf_counter()
                results = isolated_results(task, ids, task.reference_results, where=f"task {name!r}")
                seconds = time.perf_counter() - start
                ceiling = task.metric(results)
                errors = sum(r.error is not None for r in results)
                print(f"{name:<16}{task.kind:<12}{protocol[name]:<11}{len(ids):>7}{ceiling:>9.3f}{errors:>8}{seconds:>9.1f}")
                failing = [r for r in results if r.score < 1.0][: args.show_failures]
                for r in failing:
                    print(f"    {r.item_id}: score {r.score:.2f} error={r.error} {r.detail.get('message', '')}"[:200])
                incomplete |= ceiling < 1.0
        finally:
            for task in tasks.values():
                task.close()
    return 1 if incomplete else 0
