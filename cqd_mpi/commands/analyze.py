"""`python -m cqd_mpi analyze RUN_DIR`: the paper's figures as PNGs and a text summary of a run.

Works on finished runs and on runs in progress (as of their last checkpoint); reading never
blocks the running job.
"""

from __future__ import annotations

from pathlib import Path

from cqd_mpi.errors import ConfigError

HELP = "plots (elite maps, progress, timings) and a text summary of a run, from its state.h5"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run directory (holding state.h5)")
    parser.add_argument("--generation", type=int, default=None, metavar="G",
                        help="show the archives as of generation G (default: the last checkpointed one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the PNGs (default RUN_DIR/plots)")
    parser.add_argument("--lineage-depth", type=int, default=None, metavar="D",
                        help="print the elites' ancestry D generations of parents deep (default: back to the experts)")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")


def run(args) -> int:
    from cqd_mpi.analysis.runstate import RunState, summary

    state = RunState.load(args.run_dir)
    generation = state.check_generation(args.generation)
    if args.lineage_depth is not None and args.lineage_depth < 0:
        raise ConfigError(f"--lineage-depth: expected an integer >= 0, got {args.lineage_depth}")
    print(summary(state, generation, lineage_depth=args.lineage_depth))
    if args.no_plots:
        return 0
    if not state.has_archives:
        print(f"no plots yet: the run is in phase {state.phase} and has no archives")
        return 0
    from cqd_mpi.analysis.plots import render_all

    out = args.out if args.out is not None else state.rundir.plots_dir
    print("")
    for path in render_all(state, out, generation=args.generation):
        print(f"wrote {path}")
    return 0
