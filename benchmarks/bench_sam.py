"""SAM benchmark: merging a SAM-ViT-Huge-shaped model, and the SAM engine's images per second.

    python benchmarks/bench_sam.py merge [--work DIR] [--ranks 64] [--full-rank]
    python benchmarks/bench_sam.py engine [--shape tiny|vit-b|vit-h] [--images N] [--batch B] [--device cpu|cuda]

`merge` builds (once, cached under --work) a float32 SamModel with SAM-ViT-Huge's published
shape (vision encoder hidden 1280, 32 layers, 16 heads, global attention at 7/15/23/31,
output channels 256; default prompt encoder and mask decoder: about 641M parameters) with
seeded random weights, and two experts (base + small noise on every tensor). It then times,
each in a fresh process (wall time and peak RSS from wait4, page cache warm), cqd_mpi's
crossover written as an HF dir without mutation and with the SVD mutation at each --ranks
(and full rank with --full-rank), and prints how many tensors of each rank (dimensions)
the mutation touched.

`engine` times SamEngine.predict_masks on random 3-channel images of the shape's input size
(1024 for vit-b and vit-h) with box prompts, after one warm-up batch: images per second.

Both print markdown rows for docs/benchmarks.md, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL_VERSION = 1
W1, W2 = 1.02, 0.97

SHAPES = {
    "tiny": dict(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, output_channels=32,
                 window_size=8, global_attn_indexes=(1,)),
    "vit-b": dict(image_size=1024, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                  output_channels=256, window_size=14, global_attn_indexes=(2, 5, 8, 11),
                  decoder_mlp_dim=2048, decoder_heads=8),
    "vit-h": dict(image_size=1024, patch_size=16, hidden_size=1280, num_layers=32, num_heads=16,
                  output_channels=256, window_size=14, global_attn_indexes=(7, 15, 23, 31),
                  decoder_mlp_dim=2048, decoder_heads=8),
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), load average {load:.1f} at start"


def build_family(work: Path) -> dict[str, Path]:
    """The ViT-H-shaped base and two experts, written once under work/sam-vit-h-v<version>/."""
    import torch
    from safetensors.torch import save_file
    from transformers import SamModel

    from cqd_mpi.engines.sam import image_processor, sam_config

    root = work / f"sam-vit-h-v{MODEL_VERSION}"
    dirs = {name: root / name for name in ("base", "expert-a", "expert-b")}
    if all((d / "model.safetensors").is_file() for d in dirs.values()):
        return dirs
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SamModel(sam_config(**SHAPES["vit-h"]))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()
            if name != "prompt_encoder.shared_embedding.positional_embedding"}
    for index, (name, out) in enumerate(dirs.items()):
        tensors = base if name == "base" else {
            k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(index * 7919 + i)) * 0.002
            for i, (k, v) in enumerate(base.items())}
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out)
        image_processor(1024).save_pretrained(out)
        del tensors
    return dirs


def merge_child(args) -> None:
    """In the timed child process: one crossover (with the given mutation) written as an HF dir."""
    from cqd_mpi.merging.mutation import MutationSpec
    from cqd_mpi.merging.operators import crossover_stream
    from cqd_mpi.merging.weights import ModelDir, write_hf_dir

    base, a, b = (ModelDir(p) for p in args.dirs)
    if args.rank == "none":
        spec = MutationSpec(kind="none")
    else:
        spec = MutationSpec(kind="svd", rank="full" if args.rank == "full" else int(args.rank), w_max=0.3)
    started = time.perf_counter()
    stream = crossover_stream(base=base, parent1=a, parent2=b, w1=W1, w2=W2, mutation=spec, seed=1)
    write_hf_dir(stream, args.out, like=base)
    merged = time.perf_counter() - started
    by_ndim: dict[int, int] = {}
    mutated = 0
    for name in base.names:
        shape = base.spec(name).shape
        by_ndim[len(shape)] = by_ndim.get(len(shape), 0) + 1
        mutated += int(spec.mutates_svd(name, shape, base.spec(name).dtype))
    print(json.dumps({"merge_s": merged, "by_ndim": by_ndim, "mutated": mutated,
                      "params": sum(_numel(base.spec(n).shape) for n in base.names)}))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def timed(command: list[str]) -> tuple[dict, float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    out = process.stdout.read()
    if status != 0:
        raise SystemExit(f"{command} failed with status {status}")
    return json.loads(out.strip().splitlines()[-1]), wall, usage.ru_maxrss / 2**20


def run_merge(args) -> None:
    work = Path(args.work)
    started = time.perf_counter()
    dirs = build_family(work)
    print(f"machine: {machine()}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"models ready in {time.perf_counter() - started:.0f} s under {dirs['base'].parent}")
    ranks = ["none", *args.ranks] + (["full"] if args.full_rank else [])
    print("| mutation | merge s (in process) | wall s | peak RSS GiB | tensors by dims | SVD-mutated |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for rank in ranks:
        out = work / f"child-{rank}"
        command = [sys.executable, __file__, "_merge_child", "--rank", str(rank), "--out", str(out),
                   *[str(dirs[k]) for k in ("base", "expert-a", "expert-b")]]
        result, wall, rss = timed(command)
        label = "none (crossover only)" if rank == "none" else f"svd rank {rank}"
        dims = ", ".join(f"{k}-D: {v}" for k, v in sorted(result["by_ndim"].items(), key=lambda kv: int(kv[0])))
        print(f"| {label} | {result['merge_s']:.1f} | {wall:.1f} | {rss:.2f} | {dims} | "
              f"{result['mutated'] if rank != 'none' else 0} |", flush=True)
        if rank == "none":
            print(f"(parameters: {result['params'] / 1e6:.1f} M, float32)")
        _check_loads(out)


def _check_loads(out: Path) -> None:
    from transformers import SamConfig

    SamConfig.from_pretrained(out)
    assert (out / "preprocessor_config.json").is_file()


def run_engine(args) -> None:
    import numpy as np
    import torch
    from transformers import SamModel

    from cqd_mpi.engines.base import MaskPrompt
    from cqd_mpi.engines.sam import SamEngine, SamSettings, sam_config, save_model

    work = Path(args.work) / f"engine-{args.shape}"
    if not (work / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_model(SamModel(sam_config(**SHAPES[args.shape])), work)
    engine = SamEngine(work, device=args.device, settings=SamSettings(batch_size=args.batch))
    size = SHAPES[args.shape]["image_size"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = [MaskPrompt(box=(size * 0.2, size * 0.2, size * 0.7, size * 0.8))] * args.images
    engine.predict_masks(images[: args.batch], prompts[: args.batch])
    started = time.perf_counter()
    engine.predict_masks(images, prompts)
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; device {engine.device}")
    print("| shape | parameters | input | device | batch | images | seconds | images/s |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    print(f"| {args.shape} | {params / 1e6:.1f} M | {size}x{size} | {engine.device} | {args.batch} | {args.images} | "
          f"{seconds:.2f} | {args.images / seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    merge = sub.add_parser("merge")
    merge.add_argument("--work", default=str(REPO / ".bench" / "sam"))
    merge.add_argument("--ranks", nargs="*", default=["64"])
    merge.add_argument("--full-rank", action="store_true")
    engine = sub.add_parser("engine")
    engine.add_argument("--work", default=str(REPO / ".bench" / "sam"))
    engine.add_argument("--shape", choices=list(SHAPES), default="tiny")
    engine.add_argument("--images", type=int, default=64)
    engine.add_argument("--batch", type=int, default=16)
    engine.add_argument("--device", default="cpu")
    child = sub.add_parser("_merge_child")
    child.add_argument("--rank", required=True)
    child.add_argument("--out", required=True)
    child.add_argument("dirs", nargs=3)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    {"merge": run_merge, "engine": run_engine, "_merge_child": merge_child}[args.what](args)


if __name__ == "__main__":
    main()
