"""Subcommands of `python -m cqd_mpi`. Each module has `HELP`, `add_arguments(parser)` and `run(args) -> int`."""

COMMANDS = {
    "run": "cqd_mpi.commands.run",
    "demo": "cqd_mpi.commands.demo",
    "merge": "cqd_mpi.commands.merge",
    "analyze": "cqd_mpi.commands.analyze",
    "export": "cqd_mpi.commands.export",
    "compare": "cqd_mpi.commands.compare",
    "trials": "cqd_mpi.commands.trials",
    "similarity": "cqd_mpi.commands.similarity",
    "doctor": "cqd_mpi.commands.doctor",
    "check-tasks": "cqd_mpi.commands.check_tasks",
    "evaluate": "cqd_mpi.commands.evaluate",
}
