"""Model store benchmark: the run directory's size and the cost of rebuilding evicted members,
over one long run of tiny Llama models, without a budget and with two, side by side.

    python benchmarks/bench_store.py [--generations 300] [--hidden 128] [--layers 4] [--fraction 0.5]

The same config (a tiny random Llama base, three experts, three probe tasks of the runtime
tests, 15 bins per axis as in the paper) runs in this process, one torch thread, with
`runtime.model_store_bytes` null (every member on disk), 1B (the least the store can keep:
elites, inputs of jobs in flight, and ancestors within `runtime.model_store_depth` merges)
at depths 1, 2 (the default) and 4, and a `--fraction` of the unbudgeted run's final models/
size at depth 2. After every generation models/ is measured; each run's state must equal
the unbudgeted one (timings aside). It then times the tensor digest on a 256 MiB model and
prints the extrapolation to the paper's scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_MODEL_BYTES = 16e9
PAPER_GENERATIONS = 1200
PAPER_CELLS = 3 * 15 * 15


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def family(root: Path, hidden: int, layers: int) -> dict:
    from cqd_mpi.engines.tiny import build_tiny_llama
    from tests.conftest import perturbed_copy

    base = build_tiny_llama(root / "base", seed=0, hidden_size=hidden, num_layers=layers, num_heads=4)
    experts = {n: perturbed_copy(base, root / f"expert-{n}", seed=i + 1, scale=0.25)
               for i, n in enumerate(("alpha", "beta", "gamma"))}
    return {"base": base, "experts": experts}


def one_run(models: dict, run_dir: Path, generations: int, budget: str | None, depth: int = 2) -> dict:
    import json

    import numpy as np

    from cqd_mpi.run import config as config_mod
    from cqd_mpi.run.state import read_state
    from cqd_mpi.runtime.launch import conduct
    from tests.conftest import probe_config, write_config

    config = probe_config(models, run_dir, **{"runtime.model_store_bytes": budget, "runtime.threads": 1,
                                              "runtime.model_store_depth": depth})
    config["qd"].update(generations=generations, n_bins=15)
    for task in config["tasks"]:
        task["settings"]["n_items"] = 48
    path = write_config(run_dir.with_suffix(".yaml"), config)
    sizes: list[int] = []

    def echo(line: str) -> None:
        if line.startswith("gen "):
            sizes.append(dir_bytes(run_dir / "models"))

    start = time.perf_counter()
    assert conduct(config_mod.load(path), echo=echo) == "done"
    wall = time.perf_counter() - start
    report = json.loads((run_dir / "final" / "report.json").read_text())
    state = read_state(run_dir / "state.h5")
    kinds = state["models"]["kind"]
    occupants = np.concatenate([a["occupant"].ravel() for a in state["archives"].values()])
    members = {int(m) for m in occupants if m >= 0 and kinds[m] == "child"}
    return {"budget": budget or "null", "depth": depth, "wall": wall, "phases": report["phase_seconds"], "store": report["model_store"],
            "peak": max(sizes), "final": sizes[-1], "members": len(members),
            "occupied": int(np.count_nonzero(occupants >= 0)), "cells": int(occupants.size),
            "merge_mean": float(np.nanmean(state["history"]["merge_s"])), "run_dir": run_dir}


def digest_rate(root: Path) -> float:
    """GB/s of weights_digest over a 256 MiB float32 model (page cache warm)."""
    import torch
    from safetensors.torch import save_file

    from cqd_mpi.run.integrity import weights_digest

    model = root / "digest-model"
    model.mkdir()
    save_file({f"w{i}": torch.randn(1024, 4096) for i in range(16)}, str(model / "model.safetensors"))
    weights_digest(model)
    start = time.perf_counter()
    weights_digest(model)
    return 16 * 1024 * 4096 * 4 / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="the moderate budget, as a fraction of the unbudgeted run's final models/ size")
    parser.add_argument("--coverage", type=float, default=0.4,
                        help="the paper's archive coverage after 1200 generations, for the extrapolation")
    parser.add_argument("--merge-8b", type=float, default=81.0,
                        help="seconds of one 8B merge (rank-64 SVD mutation, 2 cores: 8.65 s x 9.4 from bench_merge)")
    args = parser.parse_args()

    import torch

    from tests.qd.test_cycleqd import assert_trees_equal
    from tests.runtime.helpers import comparable_state

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        root = Path(tmp)
        models = family(root, args.hidden, args.layers)
        model_bytes = dir_bytes(root / "expert-alpha") - sum(
            f.stat().st_size for f in (root / "expert-alpha").iterdir() if not f.name.endswith(".safetensors"))
        load_before = load()
        plain = one_run(models, root / "plain", args.generations, None)
        moderate = f"{int(args.fraction * plain['final'])}B"
        rows = [plain, *(one_run(models, root / f"tight-{d}", args.generations, "1B", d) for d in (1, 2, 4)),
                one_run(models, root / "moderate", args.generations, moderate)]
        for row in rows[1:]:
            assert_trees_equal(comparable_state(plain["run_dir"]), comparable_state(row["run_dir"]))
        rate = digest_rate(root)
        load_after = load()
        shutil.rmtree(root / "digest-model")

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"1 torch thread; load average before {load_before}, after {load_after}.")
    print(f"Run: tiny Llama (hidden {args.hidden}, {args.layers} layers), {model_bytes / 1e6:.2f} MB of weights per "
          f"model, {args.generations} generations, 3 probe tasks of 48 items, 15 bins per axis "
          f"({rows[0]['cells']} cells), rank-4 SVD mutation; every budgeted state equals the unbudgeted one.\n")
    print("| model_store_bytes | depth | wall s | merge s | rebuilt | rebuild s | digest s | evicted | models/ peak MB "
          "| models/ at end MB | dirs at end | members at end | cells occupied |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        s = r["store"]
        print(f"| {r['budget']} | {r['depth'] if r['budget'] != 'null' else '-'} | {r['wall']:.1f} | {r['phases']['merge']:.1f} | {s['rebuilt']} | {s['rebuild_s']:.1f} "
              f"| {s['digest_s']:.1f} | {s['evicted']} | {r['peak'] / 1e6:.1f} | {r['final'] / 1e6:.1f} "
              f"| {s['on_disk']} | {r['members']} | {r['occupied']} |")
    print(f"\nMean merge of a child: {plain['merge_mean'] * 1e3:.0f} ms. tensor digest: {rate:.2f} GB/s.")

    per_cell = rows[0]["members"] / rows[0]["occupied"]
    members = PAPER_CELLS * args.coverage * per_cell
    print(f"\nExtrapolation to the paper (8B bf16 = {PAPER_MODEL_BYTES / 1e9:.0f} GB per model, "
          f"{PAPER_GENERATIONS} generations, coverage {args.coverage:.0%} of {PAPER_CELLS} cells, "
          f"{per_cell:.2f} distinct members per occupied cell as measured):\n")
    print(f"- members: {PAPER_CELLS} x {args.coverage} x {per_cell:.2f} = {members:.0f}; without a budget "
          f"models/ = {members:.0f} x 16 GB = {members * PAPER_MODEL_BYTES / 1e12:.1f} TB.")
    for r in rows[1:]:
        kept = r["store"]["on_disk"] / r["members"]
        per_gen = r["store"]["rebuilt"] / args.generations
        print(f"- budget {r['budget']}, depth {r['depth']}: {r['store']['on_disk']} of {r['members']} members' worth of dirs on disk "
              f"({kept:.0%}) -> {kept:.2f} x {members * PAPER_MODEL_BYTES / 1e12:.1f} TB = "
              f"{kept * members * PAPER_MODEL_BYTES / 1e12:.2f} TB; {r['store']['rebuilt']} rebuilds in "
              f"{args.generations} generations = {per_gen:.2f} per generation -> {per_gen:.2f} x {args.merge_8b:.0f} s "
              f"(one 8B merge) + {per_gen:.2f} x {PAPER_MODEL_BYTES / 1e9:.0f} GB / {rate:.2f} GB/s (digest) = "
              f"{per_gen * (args.merge_8b + PAPER_MODEL_BYTES / 1e9 / rate):.0f} s per generation, "
              f"{per_gen * PAPER_GENERATIONS * (args.merge_8b + PAPER_MODEL_BYTES / 1e9 / rate) / 3600:.1f} h "
              f"over {PAPER_GENERATIONS} generations.")
    print(f"- the digest of every saved child, budget or not: 16 GB / {rate:.2f} GB/s = {16 / rate:.0f} s per save.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
