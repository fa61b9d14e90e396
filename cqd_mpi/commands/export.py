"""`python -m cqd_mpi export RUN_DIR ...`: a model of a run as a Hugging Face dir.

--aggregate OUT merges the archives' elites (by default with the run's betas, reproducing
RUN_DIR/final), --model ID OUT writes any model of the run, --elite TASK OUT an archive's elite.
A model whose weights were deleted is rebuilt from its recipe while its parents are available.
"""

from __future__ import annotations

import time

from cqd_mpi.errors import ConfigError

HELP = "write a model of a run (the aggregate, an archive's elite, or any model id) as an HF dir"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run directory (holding state.h5)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--aggregate", metavar="OUT",
                      help="theta_base + sum_k beta_k tau_k of the archives' elites, beta = softmax(f_k / T)")
    what.add_argument("--model", nargs=2, metavar=("ID", "OUT"), help="the model with this id (see `analyze`)")
    what.add_argument("--elite", nargs=2, metavar=("TASK", "OUT"), help="the elite of TASK's archive")
    what.add_argument("--baseline", nargs=2, metavar=("METHOD", "OUT"),
                      help="a merging baseline over the run's experts: ties, dare or dare-ties "
                      "(weights 1/K unless --weights)")
    beta = parser.add_mutually_exclusive_group()
    beta.add_argument("--temperature", type=float, default=None, metavar="T",
                      help="with --aggregate: softmax temperature (default 1, the run's own betas)")
    beta.add_argument("--weights", nargs="+", type=float, default=None, metavar="B",
                      help="with --aggregate or --baseline: explicit weights, one per task in config order")
    parser.add_argument("--density", type=float, default=0.2,
                        help="with --baseline: the fraction of each task vector kept (default 0.2)")
    parser.add_argument("--scale", type=float, default=1.0, help="with --baseline: lambda (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="with --baseline dare / dare-ties: the masks' seed")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is an existing model dir")
    parser.add_argument("--max-shard-size", default=None,
                        help="largest output shard, e.g. 5GB (default: the run's runtime.max_shard_size)")


def _model_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--model: expected an integer model id, got {text!r}") from None


def _model_card(core, model_id: int) -> dict:
    """Card arguments of one model of the run: the final one's, or its recipe and lineage."""
    from cqd_mpi.run.card import final_card, score_rows

    record = core.models[model_id]
    if record.kind == "aggregate":
        return {k: v for k, v in final_card(core, model_id).items() if k != "core"}
    return {"title": f"model #{model_id} ({record.kind}) of a {core.label} run", "roots": [model_id],
            "recipe": f"model #{model_id}, a {record.kind} of generation {record.generation}; its lineage follows.",
            "scores": score_rows(core, model_id, f"#{model_id}")}


def run(args) -> int:
    from cqd_mpi.analysis.export import Exporter, check_output
    from cqd_mpi.analysis.runstate import RunState
    from cqd_mpi.run.card import write_card

    if args.aggregate is None and args.temperature is not None:
        raise ConfigError("--temperature applies to --aggregate only")
    if args.aggregate is None and args.baseline is None and args.weights is not None:
        raise ConfigError("--weights applies to --aggregate and --baseline only")
    state = RunState.load(args.run_dir)
    exporter = Exporter(state, max_shard_size=args.max_shard_size)
    started = time.perf_counter()
    if args.aggregate is not None:
        out = check_output(args.aggregate, state, force=args.force)
        temperature = 1.0 if args.temperature is None else args.temperature
        members, betas, path = exporter.aggregate(out, temperature=temperature, weights=args.weights)
        for name, member, beta in zip(state.task_names, members, betas):
            print(f"{name:<16} elite {state.describe(member):<24} beta {beta:.6g}")
        weights = ", ".join(f"#{m} ({t}) x {b:.6g}" for m, t, b in zip(members, state.task_names, betas))
        cards = {"title": f"aggregate of {', '.join(state.task_names)}", "roots": list(members),
                 "recipe": f"the base plus the task vectors of the archives' elites, weighted {weights} "
                           f"(`export --aggregate`)."}
    elif args.baseline is not None:
        from cqd_mpi.merging.sparse import METHODS, SparseMerge

        method, target = args.baseline
        if method not in METHODS:
            raise ConfigError(f"--baseline: expected one of {', '.join(METHODS)}, got {method!r}")
        spec = SparseMerge(method=method, density=args.density, scale=args.scale, seed=args.seed,
                           weights=tuple(args.weights) if args.weights is not None else None)
        out = check_output(target, state, force=args.force)
        path = exporter.baseline(out, spec)
        print(f"{method} of the experts {', '.join(state.task_names)}: density {spec.density}, scale {spec.scale}, "
              f"weights {' '.join(f'{w:.6g}' for w in spec.member_weights(state.k))}")
        cards = {"title": f"{method} of {', '.join(state.task_names)}",
                 "recipe": f"`{method}` of the experts' task vectors: density {spec.density}, scale {spec.scale}, "
                           f"weights {' '.join(f'{w:.6g}' for w in spec.member_weights(state.k))}, seed {spec.seed}."}
    elif args.model is not None:
        model_id = state.check_model(_model_id(args.model[0]))
        out = check_output(args.model[1], state, force=args.force)
        how = "copied" if exporter.stored_path(model_id) is not None else "rebuilt from its recipe"
        path = exporter.model(model_id, out)
        print(f"{state.describe(model_id)}: {how}")
        cards = _model_card(state.core, model_id)
    else:
        task, target = args.elite
        elite = exporter.elite_id(task)
        out = check_output(target, state, force=args.force)
        _, path = exporter.elite(task, out)
        print(f"elite of {task}: {state.describe(elite)} {state.format_scores(state.scores[elite])}")
        cards = _model_card(state.core, elite)
    write_card(path, **{"core": state.core, **cards})
    if state.in_progress:
        print(f"note: the run is in progress (phase {state.phase}); this is as of generation {state.generations_done}")
    print(f"wrote {path} in {time.perf_counter() - started:.2f} s")
    return 0
