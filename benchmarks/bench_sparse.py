"""TIES and DARE benchmark: cqd_mpi's streamed merges next to mergekit's same methods on the
0.85B-parameter bf16 Llama of bench_merge.py.

    python benchmarks/bench_sparse.py [--work DIR] [--density 0.2] [--skip-mergekit]

The models (base and two experts, sharded at 1 GB) are bench_merge.py's, built once under
--work. Each merge runs in a fresh process (wall time and peak RSS from wait4, page cache
warm): cqd_mpi's `ties` and `dare` (merging/sparse.py, weights 1/2 each), and mergekit 0.1.5's
`ties` (normalize) and `dare_linear` from the venv .bench/venv-mergekit (docs/benchmarks.md
says how it is made), with the same density and weights. Accuracy of the TIES outputs is
measured on three tensors against a float64 evaluation of the published formula (trim to
the density by magnitude, elect the sign of the sum, mean of the agreeing entries); for
DARE, whose masks are random, the share of entries that moved from the base is shown
(expected: about the density). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_merge  # noqa: E402

OURS = """
    import json, sys, time
    started = time.perf_counter()
    from cqd_mpi.merging.sparse import SparseMerge, sparse_merge_stream
    from cqd_mpi.merging.weights import ModelDir, write_hf_dir
    imported = time.perf_counter()
    base, e1, e2 = (ModelDir(p) for p in sys.argv[1:4])
    spec = SparseMerge(method=sys.argv[5], density=float(sys.argv[6]), weights=(0.5, 0.5), seed=1)
    write_hf_dir(sparse_merge_stream(base=base, members=[e1, e2], spec=spec), sys.argv[4], like=base,
                 max_shard_size="1GB")
    print("RESULT " + json.dumps({"import_s": imported - started, "merge_s": time.perf_counter() - imported}))
"""


def mergekit_config(work: Path, models: dict[str, Path], method: str, density: float) -> Path:
    normalize = "true" if method == "ties" else "false"
    text = textwrap.dedent(f"""\
        merge_method: {method}
        base_model: {models["base"]}
        models:
          - model: {models["expert1"]}
            parameters: {{weight: 0.5, density: {density}}}
          - model: {models["expert2"]}
            parameters: {{weight: 0.5, density: {density}}}
        parameters: {{normalize: {normalize}}}
        dtype: bfloat16
    """)
    path = work / f"mergekit-{method}.yaml"
    path.write_text(text)
    return path


def ties_accuracy(out_dir: Path, models: dict[str, Path], density: float) -> str:
    """Share of elements equal to the float64 formula rounded to bf16, and the largest error."""
    import torch

    from cqd_mpi.merging.weights import ModelDir, TensorReader

    inputs = [ModelDir(models[k]) for k in ("base", "expert1", "expert2")]
    exact = {}
    for name, (base, e1, e2) in TensorReader(models=inputs, names=bench_merge.ACCURACY_TENSORS):
        b = base.double().reshape(-1)
        taus = []
        for expert in (e1, e2):
            tau = expert.double().reshape(-1) - b
            k = int(density * tau.numel())
            threshold = tau.abs().sort(descending=True).values[k - 1]
            taus.append(torch.where(tau.abs() >= threshold, tau, 0.0))
        stacked = torch.stack(taus)
        gamma = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == gamma) & (stacked != 0)
        count = agree.sum(0)
        merged = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp_min(1), 0.0)
        exact[name] = (b + merged).reshape(base.shape)
    equal = total = 0
    worst = 0.0
    for name, tensor in ModelDir(out_dir).tensors(bench_merge.ACCURACY_TENSORS):
        equal += int((tensor == exact[name].to(torch.bfloat16)).sum())
        total += tensor.numel()
        worst = max(worst, float((tensor.double() - exact[name]).abs().max()))
    return f"{100 * equal / total:.2f}% equal to the formula rounded once, max error {worst:.1e}"


def moved(out_dir: Path, models: dict[str, Path]) -> str:
    from cqd_mpi.merging.weights import ModelDir, TensorReader

    changed = total = 0
    reader = TensorReader(models=[ModelDir(models["base"]), ModelDir(out_dir)], names=bench_merge.ACCURACY_TENSORS)
    for _, (base, merged) in reader:
        changed += int((base != merged).sum())
        total += base.numel()
    return f"{100 * changed / total:.1f}% of entries moved from the base"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "merge")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--mergekit", type=Path,
                        default=REPO / ".bench" / "venv-mergekit" / "bin" / "mergekit-yaml")
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = bench_merge.build_models(args.work)
    out, logs = args.work / "out-sparse", args.work / "logs"
    rows = []
    for method in ("ties", "dare"):
        target = out / f"cqd-{method}"
        command = [*bench_merge.python(OURS), str(models["base"]), str(models["expert1"]), str(models["expert2"]),
                   str(target), method, str(args.density)]
        result = bench_merge.run(command, log=logs / f"cqd-{method}.log")
        check = ties_accuracy(target, models, args.density) if method == "ties" else moved(target, models)
        rows.append((f"cqd_mpi {method} (streamed)", result, check))
        if not args.skip_mergekit:
            name = "ties" if method == "ties" else "dare_linear"
            target = out / f"mergekit-{name}"
            command = [str(args.mergekit), str(mergekit_config(args.work, models, name, args.density)), str(target),
                       "--out-shard-size", "500M", "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
            result = bench_merge.run(command, log=logs / f"mergekit-{name}.log")
            check = ties_accuracy(target, models, args.density) if method == "ties" else moved(target, models)
            rows.append((f"mergekit 0.1.5 {name} (CLI, separate venv)", result, check))
    print(f"Machine: {bench_merge.machine()}; density {args.density}, weights 1/2 each\n")
    print("| method | merge s | wall s | CPU s | peak RSS GB | check |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, result, check in rows:
        merge = f"{result['merge_s']:.2f}" if "merge_s" in result else "-"
        print(f"| {label} | {merge} | {result['wall_s']:.2f} | {result['cpu_s']:.1f} | {result['peak_gb']:.2f} | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
