"""Runtime benchmark: what the MPI runtime costs beyond merging and evaluating.

    python benchmarks/bench_runtime.py [--work DIR] [--generations N] [--skip-demo]

1. Transfer: the 0.85B-parameter bf16 model of benchmarks/bench_merge.py sent with the
   `mpi` transport from rank 0 into 1 and 2 workers' live models (2 and 3 ranks on this
   machine), next to a plain memory copy of the same bytes measured in the same run.
2. Orchestration overhead: a whole run on that model with a null evaluator
   (benchmarks/null_task.py) under `mpiexec -n 3`, crossover without mutation; per
   generation, the time beyond merge and evaluation (transfer, gather, archive update,
   saving members, checkpoint), from the run's /history.
3. The demo: eval-phase time per generation with 1 and 2 workers (`mpiexec -n 2` vs `-n 3`),
   and the orchestration overhead as a fraction of a generation.

Prints markdown tables ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge import COPY_BANDWIDTH, build_models, machine, python, run  # noqa: E402


def with_tokenizer(models: dict[str, Path]) -> dict[str, Path]:
    """The live model needs tokenizer files next to the weights; add the tiny test tokenizer."""
    from cqd_mpi.engines.tiny import build_tokenizer

    for path in models.values():
        if not (path / "tokenizer.json").exists():
            build_tokenizer(path)
    return models


def history(run_dir: Path) -> dict[str, np.ndarray]:
    from cqd_mpi.run.state import read_state

    columns = read_state(run_dir / "state.h5")["history"]
    return {k: np.asarray(columns[k]) for k in ("merge_s", "transfer_s", "eval_s", "total_s")}


def mpirun(ranks: int, config: Path, log: Path) -> dict:
    return run([shutil.which("mpiexec"), "-n", str(ranks), sys.executable, "-m", "cqd_mpi", "run", str(config)],
               log=log)


def null_run(work: Path, models: dict[str, Path], generations: int, transport: str,
             device: str = "cpu") -> dict[str, np.ndarray]:
    run_dir = work / f"null-{transport}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "base": str(models["base"]),
        "experts": [{"task": "a", "path": str(models["expert1"])}, {"task": "b", "path": str(models["expert2"])}],
        "tasks": [{"name": n, "kind": "benchmarks.null_task:NullTask"} for n in ("a", "b")],
        "qd": {"generations": generations, "mutation": {"kind": "none"}},
        "runtime": {"run_dir": str(run_dir), "transport": transport, "max_shard_size": "1GB"},
        "engine": {"device": "auto" if device == "cuda" else device},
    }
    path = work / f"null-{transport}.yaml"
    path.write_text(yaml.safe_dump(config))
    mpirun(3, path, work / "logs" / f"null-{transport}.log")
    return history(run_dir)


def demo_run(work: Path, ranks: int, generations: int) -> dict[str, np.ndarray]:
    from cqd_mpi.demo import llm as demo

    run_dir = work / f"demo-{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = demo.demo_config(demo.build(), run_dir=run_dir)
    config["qd"]["generations"] = generations
    path = work / f"demo-{ranks}.yaml"
    path.write_text(yaml.safe_dump(config))
    mpirun(ranks, path, work / "logs" / f"demo-{ranks}.log")
    return history(run_dir)


def overhead_row(label: str, h: dict[str, np.ndarray]) -> str:
    total = h["total_s"].mean()
    other = max(0.0, (h["total_s"] - h["merge_s"] - h["eval_s"] - h["transfer_s"]).mean())
    beyond = (h["total_s"] - h["merge_s"] - h["eval_s"]).mean()
    return (f"| {label} | {len(h['total_s'])} | {h['merge_s'].mean():.2f} | {h['transfer_s'].mean():.2f} | "
            f"{h['eval_s'].mean():.2f} | {other:.2f} | {total:.2f} | {beyond / total:.1%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "runtime")
    parser.add_argument("--models", type=Path, default=REPO / ".bench" / "merge",
                        help="where bench_merge.py builds (or has built) the 0.85B models")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--demo-generations", type=int, default=24)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the workers' live models sit (cuda: a GPU node)")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.models = args.models.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])
    load_before = os.getloadavg()
    models = with_tokenizer(build_models(args.models))

    copy = run(python(COPY_BANDWIDTH), log=args.work / "logs" / "copy.log")
    nbytes = None
    transfers = {}
    for ranks in (2, 3):
        probe = run([shutil.which("mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py",
                     str(HERE / "transfer_probe.py"),
                     str(models["base"]), "3", args.device], log=args.work / "logs" / f"transfer-{ranks}.log")
        nbytes = probe["bytes"]
        transfers[ranks] = min(probe["seconds"])
    gb = nbytes / 1e9
    copy_1t = 2 * nbytes / (copy["copy_gbps_1t"] * 1e9)
    copy_best = 2 * nbytes / (max(v for k, v in copy.items() if k.startswith("copy_gbps")) * 1e9)

    print(f"Machine: {machine()}; load average before: {' '.join(f'{x:.2f}' for x in load_before)}\n")
    print("| moving the 0.85B model (bf16) | GB | seconds | vs memory copy, 1 thread | vs memory copy, all cores |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| plain memory copy (torch copy_), 1 thread | {gb:.2f} | {copy_1t:.2f} | 1.0x | {copy_1t / copy_best:.1f}x |")
    print(f"| plain memory copy (torch copy_), all cores | {gb:.2f} | {copy_best:.2f} | "
          f"{copy_best / copy_1t:.1f}x | 1.0x |")
    for ranks, seconds in transfers.items():
        print(f"| `mpi` transport, rank 0 -> {ranks - 1} worker(s)' live models on {args.device} "
              f"(mpiexec -n {ranks}, best of 3) | "
              f"{gb:.2f} | {seconds:.2f} | {seconds / copy_1t:.1f}x | {seconds / copy_best:.1f}x |")
    print()
    print("| run (mpiexec -n 3 unless noted) | generations | merge s | transfer s | eval s | other s | "
          "total s | beyond merge + eval |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for transport in ("mpi", "file"):
        h = null_run(args.work, models, args.generations, transport, args.device)
        print(overhead_row(f"0.85B, null evaluator, transport {transport}, workers on {args.device}", h))
    if not args.skip_demo:
        for ranks in (2, 3):
            h = demo_run(args.work, ranks, args.demo_generations)
            print(overhead_row(f"demo, {ranks - 1} worker(s) (mpiexec -n {ranks})", h))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(json.dumps({"copy": copy, "transfer": transfers}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
