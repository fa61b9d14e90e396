"""First code run inside a sandbox: seal the filesystem (unshare mode), set limits, drop root, run the script.

Run as ``python -I -B bootstrap.py CONFIG_JSON``; stdlib only. It prints a ready line on
stdout once the limits hold, so the host can tell a sandbox that failed to start from
untrusted code that failed. CONFIG_JSON keys: script, work_dir, limits (rlimit name ->
value), uid, gid (null: keep), seal (bool: make every mount read-only and hide the
writable and socket-bearing dirs under fresh tmpfs), keep (dirs seal must leave visible),
tmpfs_bytes, init (bool: act as pid 1 of the namespace and run the script in a child). The script is read before sealing, so it may live anywhere on the host.
"""

import ctypes
import json
import os
import resource
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
    os.environ["HOME"] = work_dir
    sys.argv = [script, *config.get("args", [])]
    sys.path[0] = work_dir
    code = compile(source, script, "exec")
    os.write(1, READY)
    exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
