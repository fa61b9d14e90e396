"""One identity per bwrap environment: a range of 65536 host uids of its own, mapped into its user
namespace, on hosts where the worker is root.

With one host uid for every environment, kernel objects keyed by uid (the keyring, per-user
limits) would be shared between items, and `chown` to a user an item creates fails (a one-uid
namespace has no such uid). Here each environment gets a free slot k (a lock file held while it
lives, so concurrent ranks never share one): host uids BASE(k) .. BASE(k) + 65535, where
BASE(k) = SANDBOX_UID + 65536 * (k + 1), are uids 0 .. 65535 inside. The rootfs, unpacked once
and owned by SANDBOX_UID, is shown to the environment through an idmapped mount (Linux >= 5.12:
open_tree, mount_setattr, move_mount) that maps SANDBOX_UID .. + 65535 onto the slot's range,
so its files belong to the environment's root without a copy. The mount lives on the host only
until the environment's sandbox has bound it (`detach`); a worker killed before that leaves its
slot's mounted, which the next process on the node to set environments up takes off (`sweep`:
every slot mounted whose lock nobody holds), as does the next holder of that slot. Elsewhere (no root, or a kernel without idmapped mounts)
environments keep one uid; `mode()` says which a node gets (doctor).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from cqd_mpi.sandboxes.python_exec import SANDBOX_UID_BASE

SANDBOX_UID = 1_400_000_000
"""On a root host the uid the unpacked rootfs belongs to, and the bwrap back-end's single
environment uid when a range cannot be had: otherwise unused, never host root."""

SIZE = 65536
SLOTS = (SANDBOX_UID_BASE - SANDBOX_UID) // SIZE - 1
"""1524: the ranges end below python_exec's sandbox uids."""
SLOT_DIR = Path(os.environ.get("CQD_UID_SLOTS", "/run/cqd_mpi/uid-slots"))

OPEN_TREE, MOVE_MOUNT, MOUNT_SETATTR = 428, 429, 442  # the same number on every architecture
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_EMPTY_PATH, AT_FDCWD = 1, 0o2000000, 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_RDONLY, MOUNT_ATTR_IDMAP, MNT_DETACH = 0x4, 0x1, 0x00100000, 2

_libc = ctypes.CDLL(None, use_errno=True)
_usable: tuple[bool, str] | None = None


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _failed(what: str) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, f"{what}: {os.strerror(number)}")


def user_namespace(uid_map: str, *, owner: int = 0) -> int:
    """An fd of a new user namespace owned by `owner` with `uid_map` (also its gid map).

    Made by util-linux's `unshare --user` holding `cat` (a new process, never a fork of this
    threaded one, whose child could deadlock on a lock another thread held); the maps are
    written from here (root), then `cat` ends and the fd keeps the namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise OSError("uid ranges need util-linux's unshare on PATH")
    ours = os.readlink("/proc/self/ns/user")
    who = {"user": owner, "group": owner, "extra_groups": []} if owner else {}
    holder = subprocess.Popen([unshare, "--user", "--", "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, close_fds=True, cwd="/", **who)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                if os.readlink(f"/proc/{holder.pid}/ns/user") != ours:
                    break
            except OSError:
                pass
            if holder.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"cannot make a user namespace as uid {owner} ({unshare} --user)")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as handle:
                handle.write(uid_map)
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        holder.stdin.close()
        holder.wait()


class UidRange:
    """A slot held by one environment: `base` (root inside), `userns` (an fd of its user
    namespace, for bwrap's --userns), `lower` (the rootfs, idmapped onto the range)."""

    def __init__(self, rootfs: str):
        SLOT_DIR.mkdir(parents=True, exist_ok=True)
        self.lock = self.slot = None
        for slot in random.sample(range(SLOTS), SLOTS):
            handle = open(SLOT_DIR / f"{slot}.lock", "w")  # noqa: SIM115 - held while the environment lives
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self.lock, self.slot = handle, slot
            break
        if self.lock is None:
            raise OSError(f"all {SLOTS} uid ranges under {SLOT_DIR} are taken")
        self.base = SANDBOX_UID + SIZE * (self.slot + 1)
        self.lower = str(SLOT_DIR / f"{self.slot}.lower")
        self.userns = -1
        try:
            self.detach()  # a crashed holder's mount
            os.makedirs(self.lower, exist_ok=True)
            self.userns = user_namespace(f"0 {self.base} {SIZE}\n", owner=self.base)
            self._mount(rootfs)
        except BaseException:
            self.close()
            raise

    def _mount(self, rootfs: str) -> None:
        idmap = user_namespace(f"{SANDBOX_UID} {self.base} {SIZE}\n")
        try:
            tree = _libc.syscall(OPEN_TREE, AT_FDCWD, rootfs.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
            if tree < 0:
                raise _failed(f"open_tree {rootfs}")
            try:
                attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, 0, idmap)
                if _libc.syscall(MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)):
                    raise _failed("mount_setattr MOUNT_ATTR_IDMAP")
                if _libc.syscall(MOVE_MOUNT, tree, b"", AT_FDCWD, self.lower.encode(), MOVE_MOUNT_F_EMPTY_PATH):
                    raise _failed(f"move_mount to {self.lower}")
            finally:
                os.close(tree)
        finally:
            os.close(idmap)

    def detach(self) -> None:
        """Take the idmapped rootfs off the host (the sandbox that bound it keeps its copy)."""
        _unmount(self.lower)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.detach()
        if self.userns >= 0:
            os.close(self.userns)
            self.userns = -1
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _unmount(path: str) -> None:
    while _libc.umount2(path.encode(), MNT_DETACH) == 0:
        pass  # stacked mounts of crashed holders, each taken off
    if ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):  # EINVAL: no mount there (any more)
        raise _failed(f"umount {path}")


def _mounted_slots() -> set[int]:
    """The slots whose `N.lower` is a mount point on the host (/proc/self/mountinfo's 5th field)."""
    slots = set()
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = Path(line.split()[4])
            if point.parent == SLOT_DIR and point.suffix == ".lower" and point.stem.isdigit():
                slots.add(int(point.stem))
    return slots


def sweep() -> list[int]:
    """Take off the host the idmapped rootfs of every slot no live environment holds (its lock
    is free: the worker that mounted it was killed before `detach`). Returns those slots."""
    swept = []
    for slot in sorted(_mounted_slots()):
        with open(SLOT_DIR / f"{slot}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            _unmount(str(SLOT_DIR / f"{slot}.lower"))
            swept.append(slot)
    return swept


def usable(rootfs: str | None = None) -> tuple[bool, str]:
    """(whether environments get a uid range here, why not), tried once per process on `rootfs`
    (default: the slot dir itself), which then sweeps the slots' stale mounts."""
    global _usable
    if _usable is None:
        if os.geteuid() != 0:
            _usable = False, "the worker is not root (newuidmap with subuid entries is not supported yet)"
        else:
            try:
                SLOT_DIR.mkdir(parents=True, exist_ok=True)
                UidRange(rootfs or str(SLOT_DIR)).close()
                sweep()
                _usable = True, ""
            except OSError as exc:
                _usable = False, f"a uid range could not be set up ({exc})"
    return _usable


def isolation() -> str:
    """What separates one bwrap environment from another on this node, in words (doctor)."""
    import platform

    from cqd_mpi.sandboxes import seccomp

    ranged, why = usable()
    if ranged:
        ids = (f"a range of {SIZE} host uids of its own (from {SANDBOX_UID + SIZE}), uids 0-{SIZE - 1} inside, "
               "the rootfs idmapped onto it")
    else:
        uid = SANDBOX_UID if os.geteuid() == 0 else os.getuid()
        ids = f"host uid {uid} for every environment, the only uid inside (chown to other users fails: {why})"
    filtered = ("a seccomp filter refusing what Docker's default profile refuses (the keyring, mounts, namespaces, "
                "modules...)" if seccomp.supported() else
                f"no seccomp filter (it is x86_64's only; this is {platform.machine()})")
    return f"{ids}; own user, pid, net, ipc, uts and mount namespaces; {filtered}"
