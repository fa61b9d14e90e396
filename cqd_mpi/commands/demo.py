"""`python -m cqd_mpi` (or `python -m cqd_mpi demo`): the embedded demo on the CPU.

Builds (or reuses from the cache) a tiny Llama base and three skill experts, then runs
CycleQD over them into ./cqd-demo and prints the final table. Rerunning resumes or, once
done, prints the table again. Under mpiexec, rank 0 builds the models and every rank runs.
"""

from __future__ import annotations

from pathlib import Path

HELP = "run the embedded demo: tiny models, three synthetic skills, CPU (the default command)"


def add_arguments(parser) -> None:
    parser.add_argument("--run-dir", default="cqd-demo", help="where the run goes (default ./cqd-demo)")
    parser.add_argument("--generations", type=int, default=None, help="CycleQD generations (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the demo models are cached (default ~/.cache/cqd_mpi)")
    parser.add_argument("--force", action="store_true", help="resume even if the run dir holds another config")


def run(args) -> int:
    import time

    from cqd_mpi.demo import llm as demo
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.runtime import launch

    started = time.perf_counter()
    rank = 0

    def load(comm):
        nonlocal rank
        rank = comm.Get_rank() if comm is not None else 0
        models = None
        if rank == 0:
            print("cqd_mpi demo: building or reusing the tiny demo models (a few minutes the first time)", flush=True)
            models = demo.build(cache_dir=args.cache_dir)
            print(f"cqd_mpi demo: models ready in {time.perf_counter() - started:.0f} s: {models.base.parent}",
                  flush=True)
        if comm is not None:
            models = comm.bcast(models, root=0)
        options = {"run_dir": Path(args.run_dir).resolve(), "seed": args.seed}
        if args.generations is not None:
            options["generations"] = args.generations
        config = config_mod.from_dict(demo.demo_config(models, **options), root=Path.cwd())
        if rank == 0:
            print(f"cqd_mpi demo: CycleQD, {config.qd.generations} generations, into {config.runtime.run_dir}",
                  flush=True)
        return config

    status = launch.start(load, force=args.force)
    if rank == 0:
        print(f"cqd_mpi demo: total {time.perf_counter() - started:.0f} s. Next: "
              f"python -m cqd_mpi analyze {args.run_dir}")
    return status
