"""lm-eval inside a worker against lm-eval's own HFLM, and pushing a child against reloading it.

    python benchmarks/bench_lm_eval.py [--docs 48] [--repeats 3] [--hidden 64] [--layers 2]

On one tiny random Llama (cqd_mpi.engines.tiny) and the fixture tasks (tests/fixtures/lmeval:
multiple choice, generate_until with regex filters, loglikelihood), each with its documents
repeated to --docs:

- documents/s of `kind: lm-eval` scoring every document through the adapter on a live
  transformers engine (what a worker does per child), against `lm_eval.simple_evaluate`
  with `HFLM` on the model's directory (model load excluded: HFLM is built once);
- seconds to push a child into the engine in place (`Engine.update`, every tensor) against
  `AutoModelForCausalLM.from_pretrained` of the child's directory (what mergekit-evolve pays
  per candidate).

Prints a markdown table and `RESULT {json}`; medians over --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures" / "lmeval"
TASKS = ("cqd_mc", "cqd_gen", "cqd_ll")


def task_dir(out: Path, docs: int) -> Path:
    """The fixture tasks with each data file repeated to `docs` documents."""
    for yaml in FIXTURES.glob("*.yaml"):
        (out / yaml.name).write_text(yaml.read_text().replace("DATA_DIR", str(out)))
    for data in FIXTURES.glob("*.jsonl"):
        lines = data.read_text().splitlines()
        (out / data.name).write_text("\n".join((lines * (docs // len(lines) + 1))[:docs]) + "\n")
    return out


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    import logging

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from cqd_mpi import schema
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.engines.tiny import build_tiny_llama
    from cqd_mpi.merging.weights import ModelDir
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.lmeval.task import LmEvalTask, Settings

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as scratch:
        root = Path(scratch)
        base = build_tiny_llama(root / "base", seed=0, hidden_size=args.hidden, num_layers=args.layers)
        child = build_tiny_llama(root / "child", seed=1, hidden_size=args.hidden, num_layers=args.layers)
        (root / "tasks").mkdir()
        tasks_dir = task_dir(root / "tasks", args.docs)
        engine = TransformersEngine(base, device="cpu", dtype="float32",
                                    settings=TransformersSettings(batch_size=args.batch_size))
        hflm = HFLM(pretrained=str(base), dtype="float32", batch_size=args.batch_size, device="cpu")
        for name in TASKS:
            settings = schema.build(Settings, {"task": name, "include_path": str(tasks_dir)}, "settings")
            task = LmEvalTask(name=name, data=None, settings=settings, context=TaskContext())
            ids = task.item_ids()

            def adapter(task=task, ids=ids):
                for start in range(0, len(ids), args.batch_size):
                    task.evaluate(engine, ids[start : start + args.batch_size])

            manager = TaskManager(include_defaults=False, include_path=str(tasks_dir))

            def reference(name=name, manager=manager):
                simple_evaluate(model=hflm, tasks=[name], task_manager=manager, bootstrap_iters=0)

            adapter()  # warm-up: tokenizer caches, first-call allocations
            ours, theirs = median_seconds(adapter, args.repeats), median_seconds(reference, args.repeats)
            rows[name] = {"docs": len(ids), "adapter_docs_per_s": len(ids) / ours,
                          "hflm_docs_per_s": len(ids) / theirs}
        tensors = list(ModelDir(child).tensors())
        push = median_seconds(lambda: engine.update(iter(tensors)), args.repeats)
        reload = median_seconds(lambda: AutoModelForCausalLM.from_pretrained(child, dtype=torch.float32),
                                args.repeats)
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, torch threads 1"
    print(f"machine: {machine}; tiny Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch_size}")
    print("| task | docs | adapter in a worker (docs/s) | simple_evaluate + HFLM (docs/s) | ratio |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['docs']} | {row['adapter_docs_per_s']:.1f} | {row['hflm_docs_per_s']:.1f} | "
              f"{row['adapter_docs_per_s'] / row['hflm_docs_per_s']:.2f} |")
    print(f"\npush a child in place: {push * 1e3:.1f} ms; from_pretrained of its dir: {reload * 1e3:.1f} ms "
          f"({reload / push:.1f}x)")
    print("RESULT " + json.dumps({"machine": machine, "tasks": rows, "push_s": push, "reload_s": reload}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
