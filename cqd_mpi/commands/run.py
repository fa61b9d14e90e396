"""`python -m cqd_mpi run CONFIG`: start or resume a run (on every rank under mpiexec/srun)."""

from __future__ import annotations

HELP = "run CycleQD from a config, or resume the run in its run_dir (under mpiexec/srun: on every rank)"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the run's YAML config")
    parser.add_argument("--force", action="store_true",
                        help="resume even if the config differs from the one frozen in the run dir")


def run(args) -> int:
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.runtime import launch

    return launch.start(lambda _comm: config_mod.load(args.config), force=args.force)
