"""What this CPU does fast: the instruction-set facts that decide which arithmetic pays.

Read from /proc/cpuinfo (Linux, x86 and Arm), so that a choice such as the bf16 range finder
(`mutation.sketch_dtype`) can be checked on the node that runs it.
"""

from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def native_bf16_matmul() -> bool | None:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX, Arm BF16);
    None where /proc/cpuinfo cannot tell. Without them torch multiplies bf16 matrices tens of
    times slower than float32: 2 against 101-126 GFLOP/s on a 2-core AVX2 host (docs/benchmarks.md)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = cpu_flags(cpuinfo)
    return bool(flags & NATIVE_BF16_FLAGS) if flags else None


def describe_bf16() -> str:
    """One word for reports: yes, no or unknown."""
    return {True: "yes", False: "no", None: "unknown"}[native_bf16_matmul()]
