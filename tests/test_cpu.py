"""cqd_mpi.cpu: reading what this CPU does fast from /proc/cpuinfo."""

import platform

import pytest
import torch

from cqd_mpi.cpu import NATIVE_BF16_FLAGS, cpu_flags, describe_bf16, native_bf16_matmul

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_flags_reads_the_x86_and_the_arm_feature_lines():
    assert {"avx2", "avx512_bf16"} <= cpu_flags(X86_CPUINFO)
    assert "bf16" in cpu_flags(ARM_CPUINFO)
    assert "bf16" not in cpu_flags(X86_CPUINFO)
    assert not cpu_flags(X86_CPUINFO.replace(" avx512_bf16", "")) & NATIVE_BF16_FLAGS
    assert cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not hasattr(torch.cpu, "_is_avx512_bf16_supported"),
    reason="torch's own bf16 probe exists on x86 builds only",
)
def test_native_bf16_matmul_agrees_with_torchs_own_probe_on_this_cpu():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16_matmul() is expected


def test_describe_bf16_is_one_word_for_the_probe():
    assert describe_bf16() == {True: "yes", False: "no", None: "unknown"}[native_bf16_matmul()]
