"""Greedy generation throughput of cqd_mpi's TransformersEngine on one device (a GPU node's check).

    python benchmarks/generate_probe.py MODEL_DIR DEVICE [BATCH ...]

Generates 64 new tokens for 128 fixed prompts at each batch size and prints one line
`RESULT {json}` with generated tokens per second per batch size, each timed after a short
warm-up generation at that batch size (the first call at a new shape pays for kernel selection).
"""

import json
import sys
import time

import torch

from cqd_mpi.engines.hf import TransformersEngine

model_dir, device = sys.argv[1], sys.argv[2]
batches = [int(b) for b in sys.argv[3:]] or [1, 16, 64]
live = TransformersEngine(model_dir, device=device)
prompts = [f"def function_{i}(values):\n    return sorted(values)[{i % 7}] +" for i in range(128)]
result = {"device": str(live.device), "dtype": str(live.dtype), "tokens_per_s": {}}
for batch in batches:
    count = min(len(prompts), max(batch, 16))
    live.generate(prompts[:batch], max_new_tokens=4, batch_size=batch)
    if live.device.type == "cuda":
        torch.cuda.synchronize(live.device)
    before, start = live.tokens_generated, time.perf_counter()
    live.generate(prompts[:count], max_new_tokens=64, batch_size=batch)
    if live.device.type == "cuda":
        torch.cuda.synchronize(live.device)
    result["tokens_per_s"][batch] = (live.tokens_generated - before) / (time.perf_counter() - start)
print("RESULT " + json.dumps(result))
