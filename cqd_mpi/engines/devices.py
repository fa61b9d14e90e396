"""Which device and dtype a worker's engine uses: the local rank's GPU, half precision off the CPU.

Shared by every engine, and by `doctor`, so that ranks of a node spread over its GPUs the
same way whatever the engine.
"""

from __future__ import annotations

import os

import torch

from cqd_mpi.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "SLURM_LOCALID",
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMI_LOCAL_RANK",
)


def local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 when none is set)."""
    for variable in _LOCAL_RANK_VARIABLES:
        value = os.environ.get(variable)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is cuda:<local rank mod visible GPUs> when CUDA is present, else the CPU; a bare
    'cuda' also takes the local rank's GPU, so that the ranks of a node spread over its GPUs."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"engine device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ConfigError(f"engine device: {device!r} was asked for, but CUDA is not available here")
    count = torch.cuda.device_count()
    if resolved.index is None:
        return torch.device("cuda", local_rank() % count)
    if resolved.index >= count:
        raise ConfigError(f"engine device: {device!r} was asked for, but this process sees {count} GPU(s) "
                          f"(cuda:0 to cuda:{count - 1}; check CUDA_VISIBLE_DEVICES)")
    return resolved


def resolve_devices(device: str | torch.device = "auto", count: int = 1) -> list[torch.device]:
    """`count` devices for one worker (a model split over several GPUs): the CPU, or `count`
    consecutive GPUs from the local rank's share (local rank x count, modulo the visible GPUs),
    so that the workers of a node take disjoint GPUs as `resolve_device` spreads single ones."""
    if count == 1:
        return [resolve_device(device)]
    first = device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        first = torch.device("cuda", local_rank() * count % torch.cuda.device_count())
    first = resolve_device(first)
    if first.type != "cuda":
        return [first]
    visible = torch.cuda.device_count()
    if count > visible:
        raise ConfigError(f"engine device: a worker needs {count} GPUs, but this process sees {visible} "
                          "(check CUDA_VISIBLE_DEVICES and tensor_parallel_size)")
    return [torch.device("cuda", (first.index + i) % visible) for i in range(count)]


def resolve_dtype(dtype: str | torch.dtype, *, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype, except half precision on the CPU, which runs in float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu" and checkpoint_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return checkpoint_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"engine dtype: expected 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def checkpoint_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(value, str):
        value = DTYPES.get(value, getattr(torch, value, torch.float32))
    return value
