"""`python -m cqd_mpi run CONFIG`: start or resume a run (on every rank under mpiexec/srun)."""

from __future__ import annotations

import logging
from pathlib import Path

HELP = "run CycleQD from a config, or resume the run in its run_dir (under mpiexec/srun: on every rank)"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument("--force", action="store_true",
                        help="resume even if the config differs from the one frozen in the run dir")


def log_to_files(run_dir: str, rank: int, world_size: int) -> None:
    """Rank 0 logs to the console and RUN_DIR/logs/rank-0.log; workers to their own file
    (warnings also to the console)."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank-{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if rank > 0:
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)


def run(args) -> int:
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.runtime import launch, mpi

    comm = mpi.world()
    if comm is None or comm.Get_size() == 1:
        config = config_mod.load(args.config)
        log_to_files(config.runtime.run_dir, 0, 1)
        return launch.run(config, force=args.force)

    def job() -> int:
        config = config_mod.load(args.config)
        log_to_files(config.runtime.run_dir, comm.Get_rank(), comm.Get_size())
        return mpi.run(comm, config, force=args.force)

    return mpi.guarded(comm, job)
