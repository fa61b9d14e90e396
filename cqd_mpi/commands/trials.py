"""`python -m cqd_mpi trials CONFIG --seeds 0 1 2 --out DIR`: the paper's comparison runs as configs.

Writes one config per trial (Table 2's five, Table 1's CMA-ES and NSGA-II) and seed, and
prints their paths, one a line, so that a job array can run line N (jobs/ablation.sbatch).
"""

from __future__ import annotations

HELP = "write the configs of Table 2's trials and Table 1's baselines for a config, over seeds"


def add_arguments(parser) -> None:
    from cqd_mpi.run.trials import TRIALS

    parser.add_argument("config", help="the run config the trials vary")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="runtime.seed of each run (default 0 1 2)")
    parser.add_argument("--out", required=True, help="directory for the configs and their run dirs")
    parser.add_argument("--trial", action="append", choices=list(TRIALS),
                        help="only this trial (repeatable); the trials: " +
                        "; ".join(f"{name}: {what}" for name, (what, _) in TRIALS.items()))


def run(args) -> int:
    from cqd_mpi.errors import ConfigError
    from cqd_mpi.run.trials import write_trials

    if any(s < 0 for s in args.seeds):
        raise ConfigError(f"--seeds: expected integers >= 0, got {args.seeds}")
    for path in write_trials(args.config, seeds=args.seeds, out_dir=args.out, trials=args.trial):
        print(path)
    return 0
