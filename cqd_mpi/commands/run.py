"""`python -m cqd_mpi run CONFIG`: start or resume a run (on every rank under mpiexec/srun)."""

from __future__ import annotations

HELP = "run CycleQD from a config, or resume the run in its run_dir (under mpiexec/srun: on every rank)"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument("--force", action="store_true",
                        help="resume even if the config differs from the one frozen in the run dir")
    parser.add_argument("--drop-lost", action="store_true",
                        help="resume a run whose archive members' weights are lost (missing and not rebuildable "
                        "bit for bit) by dropping them from the archives; recorded in the log and state.h5")


def run(args) -> int:
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.runtime import launch

    return launch.start(lambda _comm: config_mod.load(args.config), force=args.force,
                        drop_lost=args.drop_lost)
