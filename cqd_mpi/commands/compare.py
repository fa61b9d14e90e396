"""`python -m cqd_mpi compare RUN_DIR...`: the paper's Tables 1 and 2 over finished runs.

One table of test-split scores: the base, the experts, the naive average, and each method's
final model, grouped by method (and the Table 2 switches) with mean and standard deviation
over seeds; a PNG bar chart beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "one table (and a bar chart) of test-split scores over runs: methods by seed, experts, base, naive average"


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown",
                        help="how the table is printed (default markdown)")
    parser.add_argument("--chart", type=Path, default=Path("comparison.png"),
                        help="where the bar chart goes (default ./comparison.png)")
    parser.add_argument("--no-chart", action="store_true", help="print the table only")


def run(args) -> int:
    from cqd_mpi.analysis import compare

    results = [compare.read_run(path) for path in args.run_dirs]
    rows = compare.table(results)
    tasks = results[0].tasks
    if args.format == "markdown":
        print(compare.format_markdown(rows, tasks))
    elif args.format == "csv":
        print(compare.format_csv(rows, tasks))
    else:
        print(json.dumps(compare.as_json(rows, tasks, results), indent=2))
    if not args.no_chart:
        path = compare.bar_chart(rows, tasks, args.chart)
        if args.format == "markdown":
            print(f"\nwrote {path}")
    return 0
