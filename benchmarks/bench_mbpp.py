"""MBPP+ benchmark: harness items/s with oracle completions, and tiny-model generation tokens/s.

    python benchmarks/bench_mbpp.py [--items 48] [--parallel 2] [--new-tokens 64]

1. Harness alone: the fixture problems' canonical solutions (repeated to --items) go through
   MbppPlusTask.score, i.e. one sandboxed run per item plus one judge run, for each sandbox
   kind installed. No model is involved.
2. Generation: greedy completions of the MBPP+ instruction-response prompts by tiny random
   Llamas on this machine's device, all prompts in one batch vs one prompt at a time.

Prints markdown tables ready to paste, with the machine load next to them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} (1 / 5 min) on {os.cpu_count()} CPUs"


def bench_harness(items: int, parallel: int) -> list[str]:
    from cqd_mpi import schema
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.mbpp import MbppPlusTask, Settings

    rows = []
    for kind in ("bwrap", "unshare"):
        if shutil.which(kind) is None:
            rows.append(f"| {kind} | {parallel} | - | - | - | not installed |")
            continue
        task = MbppPlusTask(name="mbpp", data=str(FIXTURE), context=TaskContext(),
                            settings=schema.build(Settings, {"sandbox": kind, "parallel": parallel}, "settings"))
        problems = task.item_ids()
        ids = [problems[i % len(problems)] for i in range(items)]
        codes = [task.problems[i]["prompt"] + task.problems[i]["canonical_solution"] for i in ids]
        task.score(ids[:parallel], codes[:parallel])
        start = time.perf_counter()
        results = task.score(ids, codes)
        seconds = time.perf_counter() - start
        passed = sum(r.score for r in results)
        per_item = sum(r.seconds for r in results) / len(results)
        rows.append(f"| {kind} | {parallel} | {items} | {items / seconds:.2f} | {per_item:.3f} | "
                    f"{passed:.0f}/{items} passed |")
    return rows


def bench_generation(new_tokens: int, prompts_count: int) -> list[str]:
    import torch

    from cqd_mpi import schema
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.engines.tiny import build_tiny_llama
    from cqd_mpi.tasks.base import TaskContext
    from cqd_mpi.tasks.mbpp import MbppPlusTask, Settings

    task = MbppPlusTask(name="mbpp", data=str(FIXTURE), context=TaskContext(),
                        settings=schema.build(Settings, {}, "settings"))
    problems = task.item_ids()
    prompts = [task.prompt_text(problems[i % len(problems)]) for i in range(prompts_count)]
    rows = []
    shapes = {"tiny (h=64, 2 layers)": {"hidden_size": 64, "num_layers": 2, "num_heads": 4},
              "small (h=512, 8 layers)": {"hidden_size": 512, "num_layers": 8, "num_heads": 8}}
    with tempfile.TemporaryDirectory(prefix="cqd-bench-") as tmp:
        for label, shape in shapes.items():
            model_dir = build_tiny_llama(Path(tmp) / label.split()[0], seed=0, init_std=0.02, **shape)
            model = TransformersEngine(model_dir, settings=TransformersSettings(batch_size=len(prompts)))
            model.generate(prompts[:2], max_new_tokens=4)
            for mode, batch_size in (("batched", len(prompts)), ("unbatched", 1)):
                before = model.tokens_generated
                start = time.perf_counter()
                model.generate(prompts, max_new_tokens=new_tokens, batch_size=batch_size)
                seconds = time.perf_counter() - start
                tokens = model.tokens_generated - before
                rows.append(f"| {label} | {model.device} | {mode} | {len(prompts)} | {tokens} | "
                            f"{tokens / seconds:.0f} |")
            del model
    rows.append(f"<!-- torch {torch.__version__}, {torch.get_num_threads()} threads -->")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48, help="harness items per sandbox kind")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent sandboxes")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per generation run")
    args = parser.parse_args()

    print(f"MBPP+ harness, oracle completions ({load_note()})\n")
    print("| sandbox | parallel | items | items/s | s/item (run) | check |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in bench_harness(args.items, args.parallel):
        print(row)
    print(f"\nGreedy generation, MBPP+ prompts, {args.new_tokens} new tokens ({load_note()})\n")
    print("| model | device | mode | prompts | tokens | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in bench_generation(args.new_tokens, args.prompts):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
