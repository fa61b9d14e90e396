"""`python -m cqd_mpi` (or `python -m cqd_mpi demo [llm|sam|vqa]`): an embedded demo on the CPU.

`llm` (the default, and what the bare command runs) builds or reuses a tiny Llama base and
three skill experts, then runs CycleQD over them into ./cqd-demo. `sam` builds or reuses a
tiny Segment Anything base and two segmentation experts, runs CycleQD over them into
./cqd-sam-demo, and prints the scores normalised by the experts (Table 4) with its claim.
`vqa` reuses the llm demo's models, builds or reuses a tiny LLaVA expert for synthetic visual
questions, runs CycleQD over the four skills into ./cqd-vqa-demo, and prints every model on
every skill (Table 5) with its claim.
Rerunning resumes or, once done, prints the table again. Under mpiexec, rank 0 builds the
models and every rank runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

HELP = "run an embedded demo: tiny models trained on the CPU (llm, the default command; sam; vqa)"

DEMOS = {
    "llm": ("cqd_mpi.demo.llm", "cqd-demo", "a tiny Llama and three skill experts"),
    "sam": ("cqd_mpi.demo.sam", "cqd-sam-demo", "a tiny SAM and two segmentation experts"),
    "vqa": ("cqd_mpi.demo.vqa", "cqd-vqa-demo", "the llm demo's models and a tiny LLaVA expert"),
}


def add_arguments(parser) -> None:
    parser.add_argument("which", nargs="?", choices=list(DEMOS), default="llm",
                        help="llm: three synthetic text skills (default); sam: two synthetic segmentation domains; "
                             "vqa: the three text skills and visual question answering")
    parser.add_argument("--run-dir", default=None, help="where the run goes (default ./cqd-demo, ./cqd-sam-demo, ./cqd-vqa-demo)")
    parser.add_argument("--generations", type=int, default=None, help="CycleQD generations (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the demo models are cached (default ~/.cache/cqd_mpi)")
    parser.add_argument("--force", action="store_true", help="resume even if the run dir holds another config")
    parser.add_argument("--test-every", type=int, default=None, metavar="N",
                        help="runtime.test_every: score the would-be final model on the test split every N models")
    parser.add_argument("--write-config", default=None, metavar="PATH",
                        help="build or reuse the models, write the demo's run config to PATH and exit without "
                             "running (a config for `trials`, `run` or a job script)")


def run(args) -> int:
    import time

    from cqd_mpi.run import config as config_mod
    from cqd_mpi.runtime import launch

    module, default_dir, what = DEMOS[args.which]
    demo = importlib.import_module(module)
    name = "cqd_mpi demo" if args.which == "llm" else f"cqd_mpi demo {args.which}"
    run_dir = Path(args.run_dir or default_dir)
    started = time.perf_counter()
    rank = 0
    if args.write_config is not None:
        return write_config(demo, args, run_dir)

    def load(comm):
        nonlocal rank
        rank = comm.Get_rank() if comm is not None else 0
        models = None
        if rank == 0:
            print(f"{name}: building or reusing {what} (a few minutes the first time)", flush=True)
            models = demo.build(cache_dir=args.cache_dir)
            print(f"{name}: models ready in {time.perf_counter() - started:.0f} s: "
                  f"{models.base.parent}", flush=True)
        if comm is not None:
            models = comm.bcast(models, root=0)
        options = {"run_dir": run_dir.resolve(), "seed": args.seed}
        config = config_mod.from_dict(demo_settings(demo, models, args, options), root=Path.cwd())
        if rank == 0:
            print(f"{name}: CycleQD, {config.qd.generations} generations, into "
                  f"{config.runtime.run_dir}", flush=True)
        return config

    status = launch.start(load, force=args.force)
    if rank == 0 and status == 0 and args.which == "sam":
        from cqd_mpi.analysis import normalised
        from cqd_mpi.analysis.runstate import RunState
        from cqd_mpi.run.report import build_report

        state = RunState.load(run_dir)
        print("")
        print("\n".join(normalised.section(state, build_report(state.core))))
    if rank == 0 and status == 0 and args.which == "vqa":
        from cqd_mpi.analysis.runstate import RunState
        from cqd_mpi.run.report import build_report

        report = build_report(RunState.load(run_dir).core)
        print("")
        print("\n".join([*demo.table(report), demo.claim(report)[1]]))
    if rank == 0:
        print(f"{name}: total {time.perf_counter() - started:.0f} s. Next: "
              f"python -m cqd_mpi analyze {run_dir}")
    return status


def demo_settings(demo, models, args, options: dict) -> dict:
    """The demo's run config with the command line's generations and test_every."""
    if args.generations is not None:
        options["generations"] = args.generations
    settings = demo.demo_config(models, **options)
    if args.test_every is not None:
        settings["runtime"]["test_every"] = args.test_every
    return settings


def write_config(demo, args, run_dir: Path) -> int:
    """--write-config: the models built or reused, the config checked and written, no run."""
    import yaml

    from cqd_mpi.run import config as config_mod

    models = demo.build(cache_dir=args.cache_dir)
    settings = demo_settings(demo, models, args, {"run_dir": str(run_dir.resolve()), "seed": args.seed})
    config_mod.from_dict(settings, root=Path.cwd())
    out = Path(args.write_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(settings, sort_keys=False))
    print(out)
    return 0
