"""First code run inside a sandbox: seal the filesystem (unshare mode), set limits, drop root, run the script.

Run as ``python -I -B bootstrap.py CONFIG_JSON``; stdlib only. It prints a ready line on
stdout once the limits hold, so the host can tell a sandbox that failed to start from
untrusted code that failed. CONFIG_JSON keys: script, work_dir, limits (rlimit name ->
value), uid, gid (null: keep), seal (bool: make every mount read-only and hide the
writable and socket-bearing dirs under fresh tmpfs), keep (dirs seal must leave visible),
tmpfs_bytes, init (bool: act as pid 1 of the namespace and run the script in a child). The script is read before sealing, so it may live anywhere on the host.
Last, a seccomp filter denies new user namespaces (`deny_user_namespaces`).
"""

import ctypes
import json
import os
import platform
import resource
import struct
import sys

READY = b"cqd-sandbox-ready\n"

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_RELATIME = 1 << 21
_MS_STRICTATIME = 1 << 24

_KEPT_OPTIONS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}

HIDDEN_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run", "/home", "/root", "/mnt", "/media", "/srv")
"""Replaced by empty tmpfs in unshare mode, except those holding the Python install (read-only)."""


def _mount(libc, source, target, fstype, flags, data):
    def enc(value):
        return None if value is None else value.encode()

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _unescape(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def seal_filesystem(tmpfs_bytes, keep):
    """In a private mount namespace: every mount read-only, writable and private dirs replaced by tmpfs.

    Dirs in `keep` (the Python install, e.g. a venv under /tmp) that lie under a hidden dir
    are bound back read-only into its fresh, private tmpfs.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)
    with open("/proc/self/mountinfo") as handle:
        mounts = [line.split() for line in handle]
    for fields in mounts:
        target = _unescape(fields[4])
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in fields[5].split(","):
            flags |= _KEPT_OPTIONS.get(option, 0)
        try:
            _mount(libc, None, target, None, flags, None)
        except OSError:
            if "rw" in fields[5].split(",") and os.path.exists(target):
                raise
    for target in HIDDEN_DIRS:
        if not os.path.isdir(target) or os.path.islink(target):
            continue
        inside = [path for path in keep if path == target or path.startswith(target + "/")]
        handles = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in inside}
        _mount(libc, "tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmpfs_bytes},mode=1777")
        for path, fd in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
            _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)
            os.close(fd)


def become_init():
    """As pid 1 of a new pid namespace: fork the worker, reap everything, exit with its status.

    Returns in the worker. The init exits 128 + signal when the worker is killed, as bwrap does,
    and its exit tears down every process left in the namespace.
    """
    worker = os.fork()
    if worker == 0:
        return
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == worker:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


def apply_limits(limits):
    for name, value in limits.items():
        which = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(which, (value, hard))


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"could not drop to uid {uid}")


_CLONE_NEWUSER = 0x10000000
_EPERM, _ENOSYS = 1, 38
SECCOMP_ARCHES = {
    # machine: (AUDIT_ARCH, {syscall: number}), from the kernel's syscall tables
    "x86_64": (0xC000003E, {"clone": 56, "unshare": 272, "setns": 308, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "unshare": 97, "setns": 268, "clone3": 435}),
}


def _user_namespace_filter(machine):
    """A classic-BPF seccomp program: no clone/unshare with CLONE_NEWUSER, no setns, clone3 -> ENOSYS.

    clone3 passes its flags in memory a filter cannot read, so it answers ENOSYS and glibc
    falls back to clone, whose flags are checked. Calls of another ABI (i386 on x86_64, x32)
    are refused, since their numbers differ.
    """
    arch, numbers = SECCOMP_ARCHES[machine]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | _EPERM, 0x00050000 | _ENOSYS
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    program = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, eperm),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, 0, 1, 0x40000000),
        (ret, 0, 0, eperm),
        (jeq, 0, 1, numbers["clone3"]),
        (ret, 0, 0, enosys),
        (jeq, 0, 1, numbers["setns"]),
        (ret, 0, 0, eperm),
        (jeq, 2, 0, numbers["unshare"]),
        (jeq, 1, 0, numbers["clone"]),
        (ret, 0, 0, allow),
        (ld, 0, 0, 16),  # low half of seccomp_data.args[0]: the flags of clone and unshare
        (jset, 0, 1, _CLONE_NEWUSER),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("=HBBI", *op) for op in program)


def deny_user_namespaces():
    """Install the filter for this process and all it starts; no_new_privs first, as seccomp needs.

    Inside a new user namespace a process holds every capability over it: a step towards
    kernel attack surface that untrusted code has no use for.
    """
    machine = platform.machine()
    if machine not in SECCOMP_ARCHES:
        raise OSError(f"no seccomp filter for machine {machine!r}; expected one of {sorted(SECCOMP_ARCHES)}")
    code = _user_namespace_filter(machine)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    program = SockFprog(len(code) // 8, code)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    for args, what in [((pr_set_no_new_privs, 1, None, 0, 0), "PR_SET_NO_NEW_PRIVS"),
                       ((pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(program), 0, 0), "PR_SET_SECCOMP")]:
        if libc.prctl(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl({what}): {os.strerror(errno)}")


def main():
    config = json.loads(sys.argv[1])
    script = config["script"]
    with open(script, encoding="utf-8") as handle:
        source = handle.read()
    if config.get("seal"):
        seal_filesystem(config["tmpfs_bytes"], config.get("keep", []))
    if config.get("init"):
        become_init()
    work_dir = config["work_dir"]
    os.makedirs(work_dir, mode=0o777, exist_ok=True)
    os.chmod(work_dir, 0o777)
    os.chdir(work_dir)
    apply_limits(config["limits"])
    if config.get("uid") is not None:
        drop_privileges(config["uid"], config["gid"])
    deny_user_namespaces()
    os.environ["HOME"] = work_dir
    sys.argv = [script, *config.get("args", [])]
    sys.path[0] = work_dir
    code = compile(source, script, "exec")
    os.write(1, READY)
    exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
