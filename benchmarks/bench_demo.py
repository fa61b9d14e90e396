"""Demo benchmark: the time to build the demo models from scratch, and their test scores.

    python benchmarks/bench_demo.py [--seed N] [--run GENERATIONS]

Builds the default demo recipe (cqd_mpi.demo.llm.TrainingRecipe) into a fresh temporary cache, in a
fresh process, and reports its wall time (target: under 5 minutes on 2 cores). Then scores
the base and each expert on every skill's items with the transformers engine. With --run, it
also times `python -m cqd_mpi run` on the demo config with that many generations (one
torch thread) and prints the run's final table. Prints markdown ready for
docs/demo-calibration.md, with the machine load next to the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training recipe seed (default 0, the demo's)")
    parser.add_argument("--run", type=int, metavar="GENERATIONS", help="also time a CycleQD run")
    args = parser.parse_args()

    from cqd_mpi.demo import llm as demo
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.skills import Settings, SkillsTask

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        load_before = load()
        start = time.perf_counter()
        code = (f"from cqd_mpi.demo import llm as demo; demo.build(demo.TrainingRecipe(seed={args.seed}), "
                f"cache_dir={tmp!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        build_seconds = time.perf_counter() - start
        recipe = demo.TrainingRecipe(seed=args.seed)
        models = demo.build(recipe, cache_dir=tmp)

        print(f"\n### Demo build ({platform.node()}, {os.cpu_count()} CPUs, recipe {recipe.version})\n")
        print("| step | seconds | load before | load after |")
        print("| --- | ---: | --- | --- |")
        print(f"| build base + {len(recipe.skills)} experts | {build_seconds:.1f} | {load_before} | {load()} |")

        import torch

        torch.set_num_threads(1)
        tasks = [SkillsTask(name=s, data=None, settings=Settings(**recipe.task_settings(s)),
                            context=TaskContext()) for s in recipe.skills]
        live = TransformersEngine(models.base, device="cpu", settings=TransformersSettings(batch_size=recipe.n_items))
        print(f"\n| model | {' | '.join(recipe.skills)} | mean | eval seconds |")
        print(f"| --- |{' ---: |' * (len(recipe.skills) + 2)}")
        for name, path in {"base": models.base, **models.experts}.items():
            live.update_from_dir(path)
            start = time.perf_counter()
            scores = [t.metric(t.evaluate(live, t.item_ids())) for t in tasks]
            seconds = time.perf_counter() - start
            print(f"| {name} | {' | '.join(f'{x:.3f}' for x in scores)} | "
                  f"{sum(scores) / len(scores):.3f} | {seconds:.2f} |")
        print(f"\n(all {recipe.n_items} items per skill; eval = {len(tasks) * recipe.n_items} greedy "
              "completions, one thread)")

        if args.run:
            import yaml

            config = demo.demo_config(models, run_dir=Path(tmp) / "run", seed=args.seed,
                                      generations=args.run)
            path = Path(tmp) / "demo.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            load_before = load()
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "cqd_mpi", "run", str(path)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            run_seconds = time.perf_counter() - start
            print(f"\n| CycleQD run, {args.run} generations | {run_seconds:.1f} s | load {load_before} -> {load()} |")
            print("| --- | --- | --- |\n")
            table = out[out.find("Test-split scores"):] if "Test-split scores" in out else out[-2000:]
            print("```\n" + table.strip() + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
