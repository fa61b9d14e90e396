"""`python -m cqd_mpi compare RUN_DIR...`: the paper's Tables 1 and 2 over finished runs.

One table of test-split scores: the base, the experts, the naive average, and each method's
final model, grouped by method (and the Table 2 switches), as the mean over seeds with its
95% confidence interval, with each method's models evaluated and search time; then every
row's paired differences against the reference (CycleQD, or --reference); a PNG bar chart
beside it, and with --budget-curve the test mean against models evaluated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = ("one table (and a bar chart) of test-split scores over runs, with 95% intervals over seeds and "
        "paired differences against CycleQD: methods by seed, experts, base, naive average")


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown",
                        help="how the table is printed (default markdown)")
    parser.add_argument("--reference", metavar="LABEL",
                        help="the row every other is paired against, by its label in the table (default: the "
                             "CycleQD group; with several, 'CycleQD + SVD mutation + elite sampling')")
    parser.add_argument("--chart", type=Path, default=Path("comparison.png"),
                        help="where the bar chart goes (default ./comparison.png)")
    parser.add_argument("--no-chart", action="store_true", help="print the table only")
    parser.add_argument("--budget-curve", type=Path, metavar="PATH",
                        help="also write a PNG of each method's test mean against models evaluated, from the "
                             "runs' periodic test scores (runs with runtime.test_every set)")


def run(args) -> int:
    from cqd_mpi.analysis import budget_curve, compare
    from cqd_mpi.errors import StateError

    results = [compare.read_run(path) for path in args.run_dirs]
    rows = compare.table(results)
    tasks = results[0].tasks
    with_curve = [r for r in results if r.curve is not None]
    if args.budget_curve is not None and not with_curve:
        raise StateError(budget_curve.missing_line([r.path for r in results]))
    reference = compare.reference_row(rows, args.reference)
    compared = compare.pairs(rows, reference)
    if args.format == "markdown":
        print(compare.format_markdown(rows, tasks, reference=reference, compared=compared))
    elif args.format == "csv":
        print(compare.format_csv(rows, tasks, reference=reference, compared=compared))
    else:
        print(json.dumps(compare.as_json(rows, tasks, results, reference=reference, compared=compared), indent=2))
    written = []
    if not args.no_chart:
        written.append(compare.bar_chart(rows, tasks, args.chart))
    if args.budget_curve is not None:
        groups: dict[str, list] = {}
        for r in with_curve:
            groups.setdefault(r.label, []).append(budget_curve.with_final(r.curve, r.models_evaluated, r.final))
        average = next(row for row in rows if row.kind == "average").mean[-1]
        written.append(budget_curve.plot(groups, args.budget_curve, average=average))
        lacking = [str(r.path) for r in results if r.curve is None]
        if lacking:
            print(f"\nthe budget curve leaves out runs without periodic test scores ({budget_curve.SETTING} "
                  f"unset): {', '.join(lacking)}", file=sys.stdout if args.format == "markdown" else sys.stderr)
    if args.format == "markdown":
        for path in written:
            print(f"\nwrote {path}")
    return 0
