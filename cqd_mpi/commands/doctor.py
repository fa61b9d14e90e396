"""`python -m cqd_mpi doctor [CONFIG]`: what a job will use: MPI library, ranks, devices, back-ends."""

from __future__ import annotations

import platform
import socket

HELP = "print the MPI library, the ranks and their devices, and whether each task's back-ends are reachable"


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="a run config: also check its models and task back-ends")


def _versions() -> list[str]:
    import importlib.metadata as md

    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    for package in ("cqd_mpi", "torch", "transformers", "safetensors", "h5py", "mpi4py", "evalplus",
                    "pymysql", "docker"):
        try:
            lines.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            lines.append(f"{package} not installed")
    return lines


def _rank_info(rank: int) -> dict:
    import torch

    from cqd_mpi.cpu import describe_bf16
    from cqd_mpi.engines.devices import resolve_device

    return {"rank": rank, "host": socket.gethostname(),
            "device": "cpu (conductor: merges, does not evaluate)" if rank == 0 else str(resolve_device("auto")),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "bf16": describe_bf16()}


def run(args) -> int:
    from cqd_mpi.runtime import mpi

    comm = mpi.world()
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    infos = comm.gather(_rank_info(rank), root=0) if comm is not None else [_rank_info(0)]
    if rank != 0:
        return 0
    if size == 1:
        infos[0]["device"] = "cpu" if infos[0]["gpus"] == 0 else infos[0]["device"]
    print("== software")
    for line in _versions():
        print(f"  {line}")
    print("== MPI")
    if comm is None:
        print("  not running under an MPI launcher: one process, rank 0 evaluates in-process")
    else:
        from mpi4py import MPI

        print(f"  library: {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"  standard: MPI {'.'.join(map(str, MPI.Get_version()))}, world size {size}")
    print("== ranks")
    for info in infos:
        print(f"  rank {info['rank']:>3} on {info['host']}: {info['device']} ({info['gpus']} GPU(s) visible; "
              f"CPU bf16 dot products: {info['bf16']})")
    ok = True
    if args.config:
        ok = _check_config(args.config)
    return 0 if ok else 1


def _check_config(path: str) -> bool:
    import tempfile
    from pathlib import Path

    from cqd_mpi.errors import CqdError
    from cqd_mpi.merging.weights import ModelDir, check_compatible
    from cqd_mpi.run import config as config_mod
    from cqd_mpi.run import vision
    from cqd_mpi.runtime.worker import build_tasks

    config = config_mod.load(path)
    ok = True
    if config.qd.mutation.sketch_dtype == "bfloat16":
        from cqd_mpi.cpu import describe_bf16

        bf16 = describe_bf16()
        print("== merging")
        print(f"  [{'WARN' if bf16 == 'no' else 'ok'}] qd.mutation.sketch_dtype: bfloat16, "
              f"this node's CPU bf16 dot products: {bf16}")
    from cqd_mpi.engines import capabilities
    from cqd_mpi.tasks import task_class

    engine = config_mod.engine_class(config.engine)
    print("== engine")
    print(f"  {config.engine.kind} ({engine.__module__}:{engine.__qualname__}): "
          f"{', '.join(capabilities(engine)) or 'no capabilities'}; settings {config.engine.settings}")
    for task in config.tasks:
        needed = task_class(task.kind).capabilities_needed(config_mod.task_settings(task), root=Path(path).resolve().parent)
        print(f"  [ok] task {task.name} ({task.kind}) needs {', '.join(c.capability for c in needed)}")
    print("== models")
    try:
        base = ModelDir(config.base)
        layout = vision.layout(config)
        check_compatible(base, [layout.view(e.path) if layout else ModelDir(e.path) for e in config.experts])
        print(f"  base and {len(config.experts)} experts: compatible ({len(base.names)} tensors, "
              f"{base.nbytes / 1e9:.2f} GB each)")
        if layout is not None:
            print(f"  vision stack from {layout.template.path}: {len(layout.carried)} tensors carried, "
                  f"{len(layout.extended)} with extra vocabulary rows; name mapping {layout.names.as_config()}")
    except CqdError as exc:
        ok = False
        print(f"  PROBLEM: {exc}")
    print("== tasks")
    with tempfile.TemporaryDirectory(prefix="cqd-doctor-") as scratch:
        tasks = build_tasks(config, work_root=Path(scratch))
        try:
            for name, task in tasks.items():
                statuses = task.check_backends()
                print(f"  {name} ({task.kind}): {len(task.item_ids())} items")
                for status in statuses:
                    ok &= status.ok
                    print(f"    [{'ok' if status.ok else 'FAIL'}] {status.name}: {status.message}")
        finally:
            for task in tasks.values():
                task.close()
    return ok
