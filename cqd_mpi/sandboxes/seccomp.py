"""A seccomp filter for the OS task's bwrap environments: the system calls Docker's default
profile refuses a container without extra capabilities, refused here too (EPERM).

Written as classic BPF by hand (no library: libseccomp's Python bindings are not on PyPI for
this Python, and the program is small): the kernel keyring (`add_key`, `keyctl`,
`request_key`, whose keys belong to a uid and so would be shared by environments of one uid),
mounts and namespaces (`mount`, `umount2`, `pivot_root`, `unshare`, `setns`, `clone` with a
namespace flag; `clone3` answers ENOSYS, as in Docker, so the C library falls back to
`clone`), kernel modules, kexec, reboot, clocks, swap, quotas, bpf, perf, userfaultfd,
process_vm_*, the new mount API, and the other calls Docker lists. x86_64 only: another
architecture's calls, and x86_64's x32 ABI, are refused whole (nothing in the image uses
them). `program()` is the program as bytes (struct sock_filter[]) for bwrap's `--seccomp FD`
and for osenv_enter.py, which loads it with prctl before it starts a program.
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

REFUSED_X86_64 = {
    "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "pivot_root": 155, "_sysctl": 156, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176,
    "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212,
    "clock_settime": 227, "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl_fd": 443,
}
"""What Docker's default profile refuses a container without CAP_SYS_ADMIN and the like (x86_64 numbers)."""

CLONE, CLONE3 = 56, 435
CLONE_NAMESPACES = 0x7E020000
"""CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET."""

LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
NR, ARCH, ARG0 = 0, 4, 16
"""Offsets in struct seccomp_data: the call's number, the architecture, the first argument's low word."""


def supported() -> bool:
    """Whether this machine's architecture has the filter (x86_64)."""
    return platform.machine() in ("x86_64", "AMD64")


def program() -> bytes:
    """The filter as struct sock_filter[] bytes."""
    refused = sorted(REFUSED_X86_64.values())
    # Jump targets are counted from the end: [..., ALLOW, EPERM, ENOSYS]; `to(label, at)` is the
    # jump from instruction `at` (0-based) in a program of `length` instructions.
    length = 5 + len(refused) + 4 + 3
    allow, eperm, enosys = length - 3, length - 2, length - 1

    def to(target: int, at: int) -> int:
        return target - at - 1

    code = [(LD_ABS, 0, 0, ARCH), (JEQ, 1, 0, AUDIT_ARCH_X86_64), (RET, 0, 0, RET_ERRNO | errno.EPERM),
            (LD_ABS, 0, 0, NR)]
    code.append((JGE, to(eperm, len(code)), 0, X32_SYSCALL_BIT))
    for number in refused:
        code.append((JEQ, to(eperm, len(code)), 0, number))
    code.append((JEQ, to(enosys, len(code)), 0, CLONE3))
    code.append((JEQ, 0, to(allow, len(code)), CLONE))
    code.append((LD_ABS, 0, 0, ARG0))
    code.append((JSET, to(eperm, len(code)), to(allow, len(code)), CLONE_NAMESPACES))
    code += [(RET, 0, 0, RET_ALLOW), (RET, 0, 0, RET_ERRNO | errno.EPERM), (RET, 0, 0, RET_ERRNO | errno.ENOSYS)]
    assert len(code) == length and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in code)
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in code)
