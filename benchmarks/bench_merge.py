"""Merge benchmark: the streamed crossover and SVD mutation on a 0.85B-parameter bf16 Llama.

    python benchmarks/bench_merge.py [--work DIR] [--cpus N] [--skip-mergekit] [--full-svd] [--quick]

Builds (once, cached under --work) a synthetic Llama-shaped model with random bf16 weights
(hidden 2048, 16 layers, intermediate 5632, 16 heads, 4 kv heads, vocab 32000) and two
experts (base + small noise), sharded at 1 GB the way transformers shards. Then measures,
each in a fresh process (wall time and peak RSS from wait4, page cache warm):

- cqd_mpi's crossover written as an HF dir, and its in-process merge time;
- the same merge done by loading whole models with transformers (the authors' code path);
- mergekit 0.1.5 task_arithmetic, from the venv .bench/venv-mergekit (see --mergekit);
- cqd_mpi's crossover + SVD mutation at rank 64 and 256, with the range finder in float32
  and in bf16 (`mutation.sketch_dtype`; not run on a CPU without bf16 dot-product
  instructions, where it is tens of times slower), and full rank (extrapolated from one matrix per
  shape unless --full-svd); on more than 2 cpus also rank 64 with the whole-matrix elementwise
  passes forced onto one thread, as they ran before they used all threads there;
- the expert basis at rank 64 (built once per expert) and the crossover + mutation that uses it;
- the rank-64 randomized SVD and its update alone (one matrix per shape, timed, times the
  count): the floor of the rank-64 mutation before any elementwise pass;
- this machine's memory copy bandwidth, to express the crossover as a fraction of it, and its
  float32 and bf16 GEMM rates for the range finder's shape.

Prints a markdown table ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 16, 5632, 16, 4, 32000
SHARD_BYTES = 10**9
MODEL_VERSION = 1
W1, W2 = 1.02, 0.97


def llama_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the order transformers' LlamaForCausalLM lists them."""
    kv = KV_HEADS * HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (kv, HIDDEN),
                p + "self_attn.v_proj.weight": (kv, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            }
        )
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_model(directory: Path, tensors) -> None:
    """Shards of at most 1 GB in transformers' order and naming, written with safetensors itself."""
    from safetensors.torch import save_file

    shapes = llama_shapes()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {name: tensors(name, shapes[name]) for name in group},
            str(directory / filename),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(group, filename))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_config(directory: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig

    LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(directory)


def build_models(work: Path) -> dict[str, Path]:
    """base, expert1, expert2 under work/models, reused when already built by this version."""
    import torch

    root = work / "models"
    marker = root / "built.json"
    paths = {name: root / name for name in ("base", "expert1", "expert2")}
    spec = {
        "version": MODEL_VERSION,
        "shapes": [HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB],
    }
    if marker.exists() and json.loads(marker.read_text()) == spec:
        for path in paths.values():
            write_config(path)
        return paths
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 26, generator=generator) * 0.02).bfloat16()
    noise = (torch.randn(1 << 26, generator=generator) * 0.002).bfloat16()

    def tiled(source, name, shape, salt):
        """Random-looking data cut from a pool at an offset keyed by the name (fast to make)."""
        numel = math.prod(shape)
        offset = (
            zlib.crc32(f"{name}:{salt}".encode()) % source.numel() if numel < source.numel() else 0
        )
        flat = torch.roll(source, -offset)[: min(numel, source.numel())]
        return flat.repeat(-(-numel // flat.numel()))[:numel].reshape(shape)

    def base(name, shape):
        return (
            torch.ones(shape, dtype=torch.bfloat16)
            if len(shape) == 1
            else tiled(pool, name, shape, 0)
        )

    write_model(paths["base"], base)
    for k in (1, 2):
        write_model(
            paths[f"expert{k}"],
            lambda name, shape, k=k: base(name, shape) + tiled(noise, name, shape, k),
        )
    for path in paths.values():
        write_config(path)
    marker.write_text(json.dumps(spec))
    print(f"built models in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return paths


SPAWN = """
import json, os, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print("RUSAGE " + json.dumps({"wall_s": time.perf_counter() - started, "peak_gb": usage.ru_maxrss * 1024 / 1e9,
                              "cpu_s": usage.ru_utime + usage.ru_stime, "exit": os.waitstatus_to_exitcode(status)}))
"""


def run(command: list[str], *, log: Path) -> dict:
    """Run a command; its wall time, CPU time and peak RSS, and the JSON it printed after 'RESULT '.

    The command is started by a tiny launcher process that reports wait4's rusage: a child
    started directly from this (large) process would inherit this process's peak RSS, which
    Linux carries over into the child's maxrss at exec. Dirty pages (the previous method's
    output) are flushed first, so no method pays for another's writeback.
    """
    os.sync()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        subprocess.run(
            [sys.executable, "-S", "-c", SPAWN, *command],
            stdout=output,
            stderr=output,
            env=env,
            check=False,
        )
    text = log.read_text()
    result = {}
    for line in text.splitlines():
        if line.startswith(("RESULT ", "RUSAGE ")):
            result.update(json.loads(line.split(" ", 1)[1]))
    if result.get("exit") != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return result


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


OURS = """
    import json, sys, time
    started = time.perf_counter()
    from cqd_mpi.merging.mutation import MutationSpec
    from cqd_mpi.merging.operators import crossover_stream
    from cqd_mpi.merging.weights import ModelDir, write_hf_dir
    imported = time.perf_counter()
    base, p1, p2 = (ModelDir(p) for p in sys.argv[1:4])
    rank, niter, sketch_dtype, passes = sys.argv[5], int(sys.argv[6]), sys.argv[7], sys.argv[8]
    expert_basis = sys.argv[9] if len(sys.argv) > 9 else None
    import cqd_mpi.merging.operators
    if passes == "serial":
        cqd_mpi.merging.operators.FEW_CORES = 1 << 30
    mutation = MutationSpec(kind="none") if rank == "none" else MutationSpec(
        kind="svd", basis="expert" if expert_basis else "child", rank=rank if rank == "full" else int(rank),
        niter=niter, sketch_dtype=sketch_dtype)
    basis = None
    if expert_basis:
        from cqd_mpi.merging.basis import ExpertBasis
        basis = ExpertBasis(expert_basis)
    stream = crossover_stream(base=base, parent1=p1, parent2=p2, w1={w1}, w2={w2}, mutation=mutation, seed=1,
                              basis=basis)
    write_hf_dir(stream, sys.argv[4], like=base, max_shard_size="1GB")
    done = time.perf_counter()
    print("RESULT " + json.dumps({{"import_s": imported - started, "merge_s": done - imported}}))
"""

AUTHORS_WAY = """
    import json, sys, time
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    imported = time.perf_counter()
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    base, p1, p2 = (load(p) for p in sys.argv[1:4])
    theta = base.state_dict()
    task_vectors = [{{k: v - theta[k] for k, v in m.state_dict().items()}} for m in (p1, p2)]
    weights = torch.tensor([{w1}, {w2}])
    merged = {{}}
    for k in task_vectors[0]:
        merged[k] = torch.zeros_like(task_vectors[0][k])
        for i, tv in enumerate(task_vectors):
            merged[k] += weights[i] * tv[k]
        merged[k] /= weights.sum()
    base.load_state_dict({{k: theta[k] + merged[k] for k in theta}})
    base.save_pretrained(sys.argv[4], max_shard_size="1GB")
    done = time.perf_counter()
    print("RESULT " + json.dumps({{"import_s": imported - started, "merge_s": done - imported}}))
"""

GEMM_RATES = """
    import json, time, torch
    m, n, q = 5632, 2048, 64
    result = {}
    for name in ("float32", "bfloat16"):
        a = torch.randn(m, n).to(getattr(torch, name))
        x = torch.randn(n, q).to(a.dtype)
        y = torch.randn(m, q).to(a.dtype)
        for label, product in (("AX", lambda: a @ x), ("ATY", lambda: a.mT @ y)):
            product()
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter(); product(); best = min(best, time.perf_counter() - t)
            result[f"{name}_{label}"] = 2 * m * n * q / best / 1e9
    print("RESULT " + json.dumps(result))
"""

COPY_BANDWIDTH = """
    import json, time, torch
    size = 1 << 30
    source, target = torch.ones(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
    result = {}
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        times = []
        for _ in range(4):
            t = time.perf_counter(); target.copy_(source); times.append(time.perf_counter() - t)
        result[f"copy_gbps_{threads}t"] = 2 * size / min(times) / 1e9
    print("RESULT " + json.dumps(result))
"""

EXPERT_BASIS = """
    import json, sys, time
    started = time.perf_counter()
    from cqd_mpi.merging.basis import ensure_expert_basis
    from cqd_mpi.merging.weights import ModelDir
    imported = time.perf_counter()
    base, expert = ModelDir(sys.argv[1]), ModelDir(sys.argv[2])
    path = ensure_expert_basis(base=base, expert=expert, rank=int(sys.argv[4]), cache_dir=sys.argv[3])
    print("BASIS " + str(path))
    print("RESULT " + json.dumps({{"import_s": imported - started, "merge_s": time.perf_counter() - imported}}))
"""

SVD_PER_SHAPE = """
    import json, sys, time, torch
    sys.path.insert(0, {repo!r})
    from cqd_mpi.merging.operators import add_scaled_components, svd_factors
    shapes, rank, repeats, sketch_dtype = {shapes}, {rank!r}, {repeats}, getattr(torch, {sketch_dtype!r})
    result = {{}}
    generator = torch.Generator().manual_seed(0)
    for label, (m, n) in shapes.items():
        tau = torch.randn(m, n, generator=generator) * 0.002
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            sketch = None if sketch_dtype == torch.float32 or rank == "full" else tau.to(sketch_dtype)
            u, s, v = svd_factors(tau, rank, niter=2, generator=generator, sketch=sketch)
            w = torch.rand(s.shape[0], generator=generator) * 0.3
            add_scaled_components(tau, u, s, v, w)
            best = min(best, time.perf_counter() - t)
        result[label] = best
    print("RESULT " + json.dumps(result))
"""


def mergekit_config(work: Path, models: dict[str, Path]) -> Path:
    c1 = W1 / (W1 + W2)
    config = textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {models["base"]}
        models:
          - model: {models["expert1"]}
            parameters:
              weight: {c1!r}
          - model: {models["expert2"]}
            parameters:
              weight: {1 - c1!r}
        dtype: bfloat16
    """)
    path = work / "mergekit.yaml"
    path.write_text(config)
    return path


ACCURACY_TENSORS = (
    "model.layers.3.mlp.up_proj.weight",
    "model.layers.9.self_attn.k_proj.weight",
    "lm_head.weight",
)


def accuracy(out_dir: Path, models: dict[str, Path]) -> str:
    """How close a merged model is to the exact crossover, on a few tensors: the share of
    elements equal to the correctly rounded float64 result, and the largest absolute error."""
    import torch

    from cqd_mpi.merging.weights import ModelDir, TensorReader

    c2 = W2 / (W1 + W2)
    inputs = [ModelDir(models[k]) for k in ("base", "expert1", "expert2")]
    exact = {}
    for name, (base, e1, e2) in TensorReader(models=inputs, names=ACCURACY_TENSORS):
        b = base.double()
        exact[name] = b + (1 - c2) * (e1.double() - b) + c2 * (e2.double() - b)
    equal = total = 0
    worst = 0.0
    for name, tensor in ModelDir(out_dir).tensors(ACCURACY_TENSORS):
        equal += int((tensor == exact[name].to(torch.bfloat16)).sum())
        total += tensor.numel()
        worst = max(worst, float((tensor.double() - exact[name]).abs().max()))
    return f"{100 * equal / total:.2f}% correctly rounded, max error {worst:.1e}"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) / 2**20
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Linux {platform.release()}"


def gemm_line(rates: dict) -> str:
    """The probe's GFLOP/s: one 5632 x 2048 matrix times 64 columns, as A X and as A^T Y."""
    return ", ".join(
        f"{dtype} {rates[f'{dtype}_AX']:.0f} / {rates[f'{dtype}_ATY']:.0f} GFLOP/s (A X / A^T Y, 5632 x 2048 x 64)"
        for dtype in ("float32", "bfloat16")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "merge")
    parser.add_argument(
        "--cpus", type=int, default=None, help="pin every measured process to the first N cpus"
    )
    parser.add_argument(
        "--mergekit", type=Path, default=REPO / ".bench" / "venv-mergekit" / "bin" / "mergekit-yaml"
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--full-svd",
        action="store_true",
        help="run the full-rank SVD mutation instead of extrapolating",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the crossover, the rank-64 rows and the SVD-alone floors (no rank 256, "
        "niter 0, expert basis or full rank)",
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of the cqd_mpi crossover (best is reported)"
    )
    parser.add_argument(
        "--keep-outputs", action="store_true", help="keep the merged models under WORK/out"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.cpus:
        os.sched_setaffinity(0, range(args.cpus))
    models = build_models(args.work)
    logs = args.work / "logs"
    load_before = os.getloadavg()
    out = args.work / "out"
    rows = []

    def ours(
        rank: str,
        niter: int = 2,
        basis: Path | None = None,
        sketch: str = "float32",
        passes: str = "threaded",
    ) -> dict:
        command = [
            *python(OURS.format(w1=W1, w2=W2)),
            *map(str, models.values()),
            str(out / f"cqd-{rank}"),
            rank,
            str(niter),
            sketch,
            passes,
            *([str(basis)] if basis else []),
        ]
        label = f"cqd-{rank}-{niter}-{sketch}-{passes}" + ("-expert" if basis else "")
        return run(command, log=logs / f"{label}.log")

    copy = run(python(COPY_BANDWIDTH), log=logs / "copy.log")
    gemm = run(python(GEMM_RATES), log=logs / "gemm.log")
    crossover = min((ours("none") for _ in range(args.repeat)), key=lambda r: r["merge_s"])
    model_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    moved = 3 * model_bytes
    copy_best = max(v for k, v in copy.items() if k.startswith("copy_gbps"))
    fraction = moved / crossover["merge_s"] / 1e9 / copy_best
    rows.append(
        (
            "cqd_mpi crossover -> HF dir",
            crossover,
            f"{fraction:.0%} of copy bandwidth; {accuracy(out / 'cqd-none', models)}",
        )
    )

    if not args.skip_transformers:
        command = [
            *python(AUTHORS_WAY.format(w1=W1, w2=W2)),
            *map(str, models.values()),
            str(out / "transformers"),
        ]
        result = run(command, log=logs / "transformers.log")
        rows.append(
            (
                "transformers: load whole models, merge, save (authors' way)",
                result,
                accuracy(out / "transformers", models),
            )
        )
    if not args.skip_mergekit:
        if not args.mergekit.exists():
            rows.append(
                ("mergekit 0.1.5 task_arithmetic", None, f"not run: {args.mergekit} is missing")
            )
        else:
            command = [
                str(args.mergekit),
                str(mergekit_config(args.work, models)),
                str(out / "mergekit"),
                "--out-shard-size",
                "500M",
                "--no-copy-tokenizer",
                "--quiet",
                "--no-write-model-card",
            ]
            result = run(command, log=logs / "mergekit.log")
            rows.append(
                (
                    "mergekit 0.1.5 task_arithmetic (CLI, separate venv)",
                    result,
                    accuracy(out / "mergekit", models),
                )
            )

    from cqd_mpi.cpu import native_bf16_matmul

    sketches = ["float32", "bfloat16"] if native_bf16_matmul() is not False else ["float32"]
    if "bfloat16" not in sketches:
        rows.append(
            (
                "bf16-sketch rows",
                None,
                "not run: this CPU has no bf16 dot-product instructions, its bf16 GEMM runs at "
                f"{gemm['bfloat16_AX']:.0f} GFLOP/s (float32 {gemm['float32_AX']:.0f})",
            )
        )
    mutated = [("64", 2, sketch, "threaded") for sketch in sketches]
    if (os.cpu_count() if args.cpus is None else args.cpus) > 2:
        mutated.append(("64", 2, "float32", "serial"))
    if not args.quick:
        mutated += [("256", 2, sketch, "threaded") for sketch in sketches]
        mutated += [("64", 0, "float32", "threaded")]
    for rank, niter, sketch, passes in mutated:
        result = ours(rank, niter, sketch=sketch, passes=passes)
        rows.append(
            (
                f"cqd_mpi crossover + SVD mutation, rank {rank}, niter {niter}"
                + (", bf16 sketch" if sketch == "bfloat16" else "")
                + (", elementwise passes on one thread (as before)" if passes == "serial" else ""),
                result,
                f"{result['merge_s'] / crossover['merge_s']:.1f}x the crossover",
            )
        )
    if not args.quick:
        basis_dir = out / "basis"
        shutil.rmtree(basis_dir, ignore_errors=True)
        build = run([*python(EXPERT_BASIS.format()), str(models["base"]), str(models["expert1"]), str(basis_dir), "64"],
                    log=logs / "expert-basis-64.log")
        rows.append(("expert basis, rank 64: one-off build per expert (cached)", build,
                     f"{build['merge_s'] / crossover['merge_s']:.1f}x the crossover, once per task"))
        basis_file = next(basis_dir.glob("*.safetensors"))
        result = ours("64", 2, basis=basis_file)
        rows.append(
            (
                "cqd_mpi crossover + SVD mutation, basis expert (cached), rank 64",
                result,
                f"{result['merge_s'] / crossover['merge_s']:.1f}x the crossover",
            )
        )

    kv = KV_HEADS * HIDDEN // HEADS
    counts = {
        "q,o": ((HIDDEN, HIDDEN), 2 * LAYERS),
        "k,v": ((kv, HIDDEN), 2 * LAYERS),
        "gate,up": ((INTERMEDIATE, HIDDEN), 2 * LAYERS),
        "down": ((HIDDEN, INTERMEDIATE), LAYERS),
        "embed,lm_head": ((VOCAB, HIDDEN), 2),
    }

    def svd_alone(rank, repeats: int, sketch: str = "float32") -> tuple[float, str]:
        """One SVD + update per matrix shape, timed, times the number of matrices of that shape."""
        shapes = {label: shape for label, (shape, _) in counts.items()}
        code = SVD_PER_SHAPE.format(
            repo=str(REPO), shapes=shapes, rank=rank, repeats=repeats, sketch_dtype=sketch
        )
        timing = run(python(code), log=logs / f"svd-alone-{rank}-{sketch}.log")
        total = sum(timing[label] * count for label, (_, count) in counts.items())
        detail = ", ".join(f"{label} {timing[label]:.3g} s x{count}" for label, (_, count) in counts.items())
        return total, detail

    for sketch in sketches:
        floor, detail = svd_alone(64, repeats=3, sketch=sketch)
        rows.append(
            (
                f"rank-64 SVD + update alone, {sketch} sketch, no elementwise passes (EXTRAPOLATED)",
                {"merge_s": floor, "wall_s": float("nan"), "peak_gb": float("nan")},
                f"{floor / crossover['merge_s']:.1f}x the crossover; one matrix per shape x count: {detail}",
            )
        )
    if not args.quick:
        if args.full_svd:
            result = ours("full")
            rows.append(("cqd_mpi crossover + SVD mutation, full rank", result, ""))
        else:
            svd_total, detail = svd_alone("full", repeats=1)
            estimate = {
                "merge_s": crossover["merge_s"] + svd_total,
                "wall_s": float("nan"),
                "peak_gb": float("nan"),
            }
            rows.append(
                (
                    "cqd_mpi crossover + SVD mutation, full rank (EXTRAPOLATED)",
                    estimate,
                    f"crossover + one SVD per shape x count: {detail}",
                )
            )
    load_after = os.getloadavg()
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)

    print(
        f"\nMachine: {machine()}; measured processes pinned to {args.cpus or os.cpu_count()} cpus; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; torch threads per process: default."
    )
    print(
        f"Model: synthetic Llama, {sum(math.prod(s) for s in llama_shapes().values()) / 1e9:.3f}B params, bf16, "
        f"{model_bytes / 1e9:.2f} GB per model in 1 GB shards; page cache warm. "
        f"Memory copy bandwidth (read + write): {copy['copy_gbps_1t']:.1f} GB/s on 1 thread, "
        f"{copy_best:.1f} GB/s best. GEMM {gemm_line(gemm)}.\n"
    )
    print("| method | merge s | process wall s | CPU s | peak RSS GB | note |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, result, note in rows:
        if result is None:
            print(f"| {label} | - | - | - | - | {note} |")
            continue
        merge = f"{result['merge_s']:.2f}" if "merge_s" in result else "-"
        cpu = f"{result['cpu_s']:.1f}" if "cpu_s" in result else "-"
        print(
            f"| {label} | {merge} | {result['wall_s']:.2f} | {cpu} | {result['peak_gb']:.2f} | {note} |"
        )
    print(
        "\nmerge s: inside the process, after imports (mergekit: the whole CLI run). "
        f"Copy-bandwidth fraction: (2 inputs read + 1 output written = {moved / 1e9:.1f} GB) / merge s, "
        "over the copy bandwidth measured above."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
