"""The cost of one CycleQD generation at the paper's scale, by phase, and of 1200 generations.

    python benchmarks/bench_paper_scale.py --shape llama-3-8b --device cuda     # on a GPU node
    python benchmarks/bench_paper_scale.py --shape tiny --device cpu --mbpp-items 8 --db-items 4 \\
        --os-items 4 --rounds 2 --new-tokens 32                                # the path, on a CPU

One generation's workload as the paper sizes it: a Llama-3-8B-shaped model with random
weights (benchmarks/llama_shapes.py: the published config, no download); the search split
of MBPP+ (--mbpp-items, half of MBPP+'s 378), of AgentBench DB (--db-items, half of dev +
test) and of OS (--os-items), each DB and OS item run for --rounds rounds against fixed
environment replies, so no server is needed. Random weights never stop early, so every
completion and reply runs to its cap: the evaluation measured is an upper bound.

Phases: the crossover and rank-r SVD mutation of two parents on this node's CPU (what
rank 0 does), the push of the child into the engine (the transfer), the evaluation. From
them, for 1, 8 and 16 workers (items split evenly; the child reaches every worker at once),
the wall time per generation with `pipeline_depth: 1` (the next child is merged while this
one is evaluated: max(merge, transfer + eval / W)) and without (depth 0: their sum), the
workers' idle share, and GPU-hours per 1200 generations, next to the paper's 410 H100-hours
and the target of 100. Prints markdown tables and `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
MBPP_FIXTURE = REPO / "tests" / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"
DB_FIXTURE = REPO / "tests" / "fixtures" / "dbbench" / "dev.jsonl"
PAPER_H100_HOURS = 410
TARGET_HOURS = 100
GENERATIONS = 1200

DB_REPLY = "[('Alice', 30, 'Engineering'), ('Bob', 25, 'Sales'), ('Carol', 41, 'Engineering')]"
OS_REPLY = "The output of the OS:\n\ntotal 12\n-rw-r--r-- 1 root root  220 Jan  1 00:00 .bash_logout\n" \
           "-rw-r--r-- 1 root root 3771 Jan  1 00:00 .bashrc\ndrwxr-xr-x 2 root root 4096 Jan  1 00:00 data"
OS_INSTRUCTION = (
    "You are an assistant that will act like a person, I will play the role of linux(ubuntu) operating "
    "system. Your goal is to implement the operations required by me or answer to the question proposed "
    "by me. For each of your turn, you should first think what you should do, and then take exact one of "
    "the three actions: \"bash\", \"finish\" or \"answer\".\n\n1. If you think you should execute some bash "
    "code, take bash action, and you should print like this:\n\nThink: put your thought here.\n\nAct: bash"
    "\n\n```bash\n# put your bash code here\n```\n\n2. If you think you have finished the task, take finish "
    "action, and you should print like this:\n\nThink: put your thought here.\n\nAct: finish\n\n3. If you "
    "think you have got the answer to the question, take answer action, and you should print like this:\n\n"
    "Think: put your thought here.\n\nAct: answer(Your answer to the question should be put in this pair of "
    "parentheses)\n\nIf the output is too long, I will truncate it. The truncated output is not complete. "
    "You have to deal with the truncating problem by yourself. Attention, your bash code should not contain "
    "any input operation. Once again, you should take only exact one of the three actions in each turn."
)
"""A stand-in for AgentBench OS's instruction (its 1-shot example follows in `os_opening`)."""


def mbpp_conversations(data: Path, count: int):
    from bench_engines import mbpp_conversations as conversations

    return conversations(data, count)


def db_openings(data: Path, count: int) -> list[list[dict[str, str]]]:
    from cqd_mpi.tasks.dbbench import Episode, load_items

    items = load_items(data)
    return [Episode(item=items[i % len(items)], max_rounds=5).history for i in range(count)]


def os_opening(index: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": OS_INSTRUCTION + "\n\nNow, my problem is:\n\ntell me how many files are in "
                                                     "the directory \"/etc\"?"},
        {"role": "assistant", "content": "Think: To count the files in /etc, I need to print all the files in "
                                         "it.\n\nAct: bash\n\n```bash\nls /etc\n```"},
        {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-"
                                    "dispatcher protocols selinux tmpfiles.d [truncated because the output is "
                                    "too long]"},
        {"role": "assistant", "content": "Think: The output has been truncated because it is too long, so I need "
                                         "to count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc "
                                         "| wc -l\n```"},
        {"role": "user", "content": "The output of the OS:\n220"},
        {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
        {"role": "user", "content": f"Now, I will start a new problem in a new OS. My problem is:\n\nFind the "
                                    f"largest file under /data/case-{index} and print its size in bytes."},
    ]


def run_rounds(engine, openings, *, rounds: int, new_tokens: int, reply: str) -> int:
    """Each conversation for `rounds` agent turns, the environment answering `reply` each time."""
    conversations = [list(c) for c in openings]
    for _ in range(rounds):
        replies = engine.chat(conversations, max_new_tokens=new_tokens)
        for conversation, text in zip(conversations, replies):
            conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": reply}]
    return len(conversations) * rounds


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--mbpp-items", type=int, default=189)
    parser.add_argument("--db-items", type=int, default=180)
    parser.add_argument("--os-items", type=int, default=72)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=512, help="cap per MBPP+ completion and per agent reply")
    parser.add_argument("--mutation-rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the merge")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--mbpp-data", type=Path, default=MBPP_FIXTURE)
    parser.add_argument("--db-data", type=Path, default=DB_FIXTURE)
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "paper-scale")
    args = parser.parse_args()

    import llama_shapes
    import numpy as np
    import torch

    from cqd_mpi.engines import create
    from cqd_mpi.merging.mutation import MutationSpec
    from cqd_mpi.merging.operators import crossover_stream
    from cqd_mpi.merging.weights import ModelDir
    from cqd_mpi.qd.sampling import sample_crossover_weights

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    (base_dir, build_s) = timed(lambda: llama_shapes.build(args.shape, args.work / f"{args.shape}-base", seed=0,
                                                            dtype=dtype))
    expert_dir = llama_shapes.build(args.shape, args.work / f"{args.shape}-expert", seed=1, dtype=dtype)
    base, expert = ModelDir(base_dir), ModelDir(expert_dir)

    torch.set_num_threads(args.threads)
    w1, w2 = sample_crossover_weights(np.random.default_rng(0))
    mutation = MutationSpec(kind="svd", basis="child", rank=args.mutation_rank, w_max=0.3)
    child, merge_s = timed(lambda: [(n, t.clone()) for n, t in crossover_stream(
        base=base, parent1=expert, parent2=base, w1=w1, w2=w2, mutation=mutation, seed=1)])

    settings = ({"gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
                 "enforce_eager": args.device == "cpu", "chat_template": "instruction-response"}
                if args.engine == "vllm" else {"chat_template": "instruction-response", "batch_size": 64})
    engine, start_s = timed(lambda: create(args.engine, base_dir, device=args.device, settings=settings))
    _, transfer_s = timed(lambda: engine.update(child))
    engine.chat(mbpp_conversations(args.mbpp_data, 2), max_new_tokens=4)

    phases = {}
    before = engine.tokens_generated
    _, phases["mbpp"] = timed(lambda: engine.chat(mbpp_conversations(args.mbpp_data, args.mbpp_items),
                                                  max_new_tokens=args.new_tokens))
    _, phases["db"] = timed(lambda: run_rounds(engine, db_openings(args.db_data, args.db_items), rounds=args.rounds,
                                               new_tokens=args.new_tokens, reply=DB_REPLY))
    _, phases["os"] = timed(lambda: run_rounds(engine, [os_opening(i) for i in range(args.os_items)],
                                               rounds=args.rounds, new_tokens=args.new_tokens, reply=OS_REPLY))
    tokens = engine.tokens_generated - before
    eval_s = sum(phases.values())
    engine.close()

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.shape} ({sum(t.numel() for _, t in child) / 1e9:.2f}B parameters, {dtype}), engine {args.engine} "
          f"on {args.device} ({device}); merge on {args.threads} CPU threads of {os.cpu_count()}; load {load}")
    print(f"workload: MBPP+ {args.mbpp_items} items, DB {args.db_items} x {args.rounds} rounds, OS {args.os_items} "
          f"x {args.rounds} rounds, <= {args.new_tokens} new tokens each; {tokens} tokens generated "
          f"({tokens / eval_s:.0f} tokens/s); engine start {start_s:.1f} s, model build {build_s:.1f} s\n")
    print("| phase (one generation, one worker) | seconds | where |")
    print("| --- | --- | --- |")
    print(f"| merge + rank-{args.mutation_rank} SVD mutation | {merge_s:.1f} | CPU (rank 0) |")
    print(f"| transfer (push the child into the engine) | {transfer_s:.2f} | worker ({args.device}) |")
    for name, seconds in phases.items():
        print(f"| evaluation: {name} | {seconds:.1f} | worker ({args.device}) |")
    print(f"| GPU-seconds per generation (transfer + evaluation) | {transfer_s + eval_s:.1f} | |\n")

    print(f"| workers | wall s / generation, depth 1 | workers idle | GPU-hours / {GENERATIONS} generations, depth 1 "
          f"| depth 0 | paper | target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for workers in (1, 8, 16):
        busy = transfer_s + eval_s / workers
        wall = max(merge_s, busy)
        hours = GENERATIONS * workers * wall / 3600
        hours_0 = GENERATIONS * workers * (merge_s + busy) / 3600
        idle = (wall - busy) / wall
        rows.append({"workers": workers, "wall_s": wall, "idle": idle, "gpu_hours": hours, "gpu_hours_depth0": hours_0})
        print(f"| {workers} | {wall:.1f} | {idle:.1%} | {hours:.1f} | {hours_0:.1f} | {PAPER_H100_HOURS} | "
              f"<= {TARGET_HOURS} |")
    print("RESULT " + json.dumps({"shape": args.shape, "device": args.device, "engine": args.engine,
                                  "merge_s": merge_s, "transfer_s": transfer_s, "eval_s": phases, "tokens": tokens,
                                  "start_s": start_s, "workers": rows, "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
