"""The OS task's `bwrap` back-end: each item in bubblewrap, as root of its own user namespace.

For GPU nodes without a container engine: no daemon and no root on the host. The image is
a rootfs directory (env/os-image.sh's tarball, unpacked once per node by `ensure_rootfs`).
An environment is two nested bubblewrap sandboxes:

- the outer one owns a new user namespace (the worker's uid is root there, nothing else is
  mapped), new pid, network (loopback only), ipc, uts (host name `cqd-os`) and cgroup
  namespaces, and sees the host's /usr read-only and the rootfs. It mounts a tmpfs of
  `disk_bytes` (and `inodes`) and an overlay: the rootfs below, the tmpfs above, so
  whatever the item writes lands in the tmpfs and the rootfs is never changed;
- the inner one, under `prlimit` (processes, address space per process, file size), pivots
  into the overlay with its own pid namespace, a fresh /proc, a read-only /dev of the usual
  nodes, a sized /dev/shm, Docker's default capabilities (and an empty /proc/tty/driver, which
  host root owns and so no one in the namespace could read), and runs `bash` as its pid 1: the
  environment's first process, which lives until the host closes its stdin.

The shell, the init and the check scripts are started in the environment by
osenv_enter.py (the host's Python joins its namespaces; the same limits and capabilities).
Both sandboxes die with their parent (SIGKILL of the worker included), and the pid
namespaces take every process of the item along; the tmpfs goes with them, so nothing stays
on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes import seccomp, uidrange
from cqd_mpi.sandboxes.osenv import (
    ENVIRONMENT,
    HOSTNAME,
    WATCHED,
    Entry,
    Environment,
    EnvironmentFailure,
    EnvLimits,
    FdChannel,
    ScriptResult,
    Shell,
    digest,
    listed,
    watched,
)
from cqd_mpi.sandboxes.osenv import nspid as ns_pids
from cqd_mpi.sandboxes.python_exec import _descendants, _kill_tree, _system_binds, _wait_gone
from cqd_mpi.sandboxes.uidrange import SANDBOX_UID

ENTER = Path(__file__).with_name("osenv_enter.py")

DOCKER_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
               "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10,
               "CAP_SYS_CHROOT": 18, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31}
"""Docker's default capabilities (names and numbers): what root in an environment may do,
within its own user namespace."""

OVERHEAD_PROCESSES = 8
"""Processes of the sandboxes themselves, counted with the item's under RLIMIT_NPROC."""

LOWER, UPPER = "/run/cqd/lower", "/run/cqd/upper"

OUTER_SCRIPT = r"""
set -e
mount -t tmpfs -o "size=$1,nr_inodes=$2,mode=0755" cqd-item "$UPPER"
mkdir "$UPPER/up" "$UPPER/work" "$UPPER/root"
options="lowerdir=$LOWER,upperdir=$UPPER/up,workdir=$UPPER/work"
mount -t overlay cqd-root -o "$options,userxattr" "$UPPER/root" 2>/dev/null \
    || mount -t overlay cqd-root -o "$options" "$UPPER/root"
shift 2
exec "$@"
"""


def bwrap_binary() -> str:
    """The bwrap on PATH, or BackendUnavailable saying how to get it."""
    found = shutil.which("bwrap")
    if found is None:
        raise BackendUnavailable("the OS task's 'bwrap' back-end needs bubblewrap: 'bwrap' is not on PATH "
                                 "(apt-get install bubblewrap)")
    return found


def sandbox_uid() -> int:
    """The host uid environments (and their unpacked rootfs) belong to."""
    return SANDBOX_UID if os.geteuid() == 0 else os.getuid()


def _as_sandbox_user() -> dict:
    """Popen arguments that start a process as sandbox_uid() (nothing to change unless root)."""
    return _as_user(SANDBOX_UID) if os.geteuid() == 0 else {}


def _as_user(uid: int) -> dict:
    return {"user": uid, "group": uid, "extra_groups": []}


def default_rootfs_cache() -> Path:
    """Where tarballs are unpacked: beside env/os-image.sh's cache when root (the sandbox uid
    must reach it), else the user's cache."""
    from cqd_mpi.locations import cache_root

    if os.geteuid() == 0:
        return Path(os.environ.get("CQD_CACHE_DIR", "/var/cache/cqd_mpi")) / "os-rootfs"
    return cache_root() / "os-rootfs"


def bwrap_usable() -> tuple[bool, str]:
    """(works, message) for doctor: bwrap on PATH and able to make the namespaces an environment needs."""
    try:
        bwrap = bwrap_binary()
    except BackendUnavailable as exc:
        return False, str(exc)
    command = [bwrap, "--unshare-user", "--uid", "0", "--unshare-pid", "--unshare-net", *_system_binds(),
               "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/", **_as_sandbox_user())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{bwrap} could not run: {exc}"
    if result.returncode != 0:
        return False, (f"{bwrap} cannot create user, pid and network namespaces here: {result.stderr.strip()[-300:]} "
                       "(allow unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1)")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    return True, f"{version or bwrap}: user, pid and network namespaces work; isolation: {uidrange.isolation()}"



def ensure_rootfs(source: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The rootfs directory of an image: `source` itself if it is a directory, else the tarball
    unpacked once (per node and cache dir) under `cache_dir`, locked against concurrent ranks.

    Files are unpacked with their modes and owned by sandbox_uid(), root inside the environment.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return source
    if not source.is_file():
        raise BackendUnavailable(f"OS rootfs {source} does not exist; build it with env/os-image.sh "
                                 "(it prints the tarball's path)")
    info = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser()
    target = cache / f"{source.name.split('.')[0]}-{key}"
    if (target / ".cqd-complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".cqd-complete").exists():
            return target
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        try:
            result = subprocess.run(["tar", "-x", "-f", str(source), "-C", str(partial), "--no-same-owner",
                                     "--preserve-permissions", "--exclude=./dev/*"],
                                    capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                raise BackendUnavailable(f"cannot unpack OS rootfs {source} into {cache}: {result.stderr.strip()[-500:]}")
            uid = sandbox_uid()
            if os.geteuid() == 0:
                subprocess.run(["chown", "-hR", f"{uid}:{uid}", str(partial)], check=True, timeout=1800)
            partial.chmod(0o755)
            (partial / ".cqd-complete").write_text(f"{source}\n")
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _resolve(root: str, rel: str, *, follow_last: bool = False) -> str | None:
    """`rel` inside `root` with every symlink resolved inside `root` (None when it leads nowhere)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    current = root
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, name)
        if not os.path.lexists(candidate):
            return None
        if os.path.islink(candidate) and (parts or follow_last):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            base = root if target.startswith("/") else current
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            current = base
            continue
        current = candidate
    return current


def entry_at(path: str) -> Entry:
    """The Entry of a host path, never following it (the last component may be a symlink)."""
    info = os.lstat(path)
    if stat.S_ISREG(info.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            return "file", digest(iter(lambda: handle.read(1 << 20), b""))
    if stat.S_ISLNK(info.st_mode):
        return "link", os.readlink(path)
    if stat.S_ISDIR(info.st_mode):
        for name in ("user.overlay.opaque", "trusted.overlay.opaque"):
            with contextlib.suppress(OSError):
                if os.getxattr(path, name, follow_symlinks=False) == b"y":
                    return "opaque", ""
        return "dir", ""
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
        return "gone", ""
    return "other", oct(info.st_mode)


def _may_hold(rel: str, patterns: Sequence[str]) -> bool:
    """Whether a directory could contain a watched path (a prefix of some pattern)."""
    parts = rel.split("/")
    for pattern in patterns:
        head = pattern.split("/")[: len(parts)]
        if len(head) == len(parts) and all(_match(p, h) for p, h in zip(parts, head)):
            return True
    return watched(rel, patterns)


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


class BwrapEnvironment(Environment):
    """One item's environment under bubblewrap; see the module docstring."""

    backend = "bwrap"

    def __init__(self, *, rootfs: str | os.PathLike, image: str, limits: EnvLimits, label: str = ""):
        super().__init__(image=image, limits=limits)
        self.rootfs = str(Path(rootfs).resolve())
        self.label = label
        bwrap = bwrap_binary()
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise BackendUnavailable("the OS task's 'bwrap' back-end needs prlimit (util-linux) on PATH")
        limits = self.limits
        inner = [
            prlimit, f"--nproc={limits.processes + OVERHEAD_PROCESSES}", f"--as={limits.memory_bytes}",
            f"--fsize={limits.disk_bytes}", "--core=0", "--",
            "/run/cqd/bwrap", "--as-pid-1", "--unshare-pid", "--die-with-parent",
            "--bind", f"{UPPER}/root", "/", "--proc", "/proc", "--tmpfs", "/proc/tty/driver", "--dev", "/dev",
            "--size", str(limits.disk_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--cap-drop", "ALL", *[a for cap in DOCKER_CAPS for a in ("--cap-add", cap)], *self._seccomp_args(),
            "--chdir", "/", "--clearenv", *[a for k, v in ENVIRONMENT.items() for a in ("--setenv", k, v)],
            "--", "/bin/bash",
        ]
        self.ids = uidrange.UidRange(self.rootfs) if uidrange.usable(self.rootfs)[0] else None
        identity = ["--userns", str(self.ids.userns)] if self.ids else ["--unshare-user", "--uid", "0", "--gid", "0"]
        outer = [
            bwrap, *identity, "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--hostname", HOSTNAME, "--unshare-cgroup-try", "--die-with-parent", "--cap-add", "ALL",
            *_system_binds(), "--ro-bind", bwrap, "/run/cqd/bwrap", "--ro-bind", self.ids.lower if self.ids else self.rootfs, LOWER,
            "--dir", UPPER, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--setenv", "LOWER", LOWER, "--setenv", "UPPER", UPPER,
            "--", "/bin/sh", "-c", OUTER_SCRIPT, "cqd-outer", str(limits.disk_bytes), str(limits.inodes), *inner,
        ]
        self._launchers: set[subprocess.Popen] = set()
        try:
            self.process = subprocess.Popen(outer, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, start_new_session=True, close_fds=True, cwd="/",
                                            pass_fds=[fd for fd in (self._filter, self.ids and self.ids.userns) if fd],
                                            **(_as_user(self.ids.base) if self.ids else _as_sandbox_user()))
        finally:
            if self._filter is not None:
                os.close(self._filter)
        try:
            self._wait_ready()
            if self.ids:
                self.ids.detach()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        self.process.stdin.write(b"echo cqd-ready\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + self.limits.start_seconds
        out = b""
        while b"cqd-ready\n" not in out:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, min(0.5, remaining)))
            if ready:
                data = os.read(self.process.stdout.fileno(), 4096)
                if not data:
                    break
                out += data
            elif remaining <= 0:
                break
        if b"cqd-ready\n" not in out:
            self.process.kill()
            err = self.process.stderr.read().decode(errors="replace").strip()[-800:]
            raise BackendUnavailable(f"the OS task's 'bwrap' back-end could not start an environment of {self.image!r} "
                                     f"(rootfs {self.rootfs}): {err or 'no message'}")
        holder = outer = None
        for pid in sorted(_descendants(self.process.pid)):
            nspid = ns_pids(pid)
            if len(nspid) == 3 and nspid[2] == 1:
                holder = pid
            elif len(nspid) == 2 and nspid[1] == 1:
                outer = pid
        if holder is None or outer is None:
            raise BackendUnavailable(f"the 'bwrap' environment started but its processes were not found "
                                     f"(holder {holder}, outer {outer})")
        self.holder, self.outer = holder, outer
        self.first_pid = holder
        self.pid_namespace = os.readlink(f"/proc/{holder}/ns/pid")
        self.upper = f"/proc/{outer}/root{UPPER}/up"

    def _seccomp_args(self) -> list[str]:
        """bwrap's --seccomp FD for the environment's first process (the filter of seccomp.py in a
        memfd that the outer sandbox, its shell and prlimit pass on), or nothing where unsupported."""
        self._filter = None
        if not seccomp.supported():
            return []
        self._filter = os.memfd_create("cqd-seccomp", 0)
        os.write(self._filter, seccomp.program())
        os.lseek(self._filter, 0, os.SEEK_SET)
        return ["--seccomp", str(self._filter)]

    # ------------------------------------------------------------- processes

    def _enter(self, argv: Sequence[str], environment: Mapping[str, str], *, pty: bool):
        """Start osenv_enter.py for `argv`; (launcher process, host pid of the program, pty master or None)."""
        ours, theirs = socket.socketpair()
        limits = self.limits
        config = {
            "pid": self.holder, "argv": list(argv), "env": dict(environment), "cwd": "/", "pty": pty,
            "status_fd": theirs.fileno(), "caps": sorted(DOCKER_CAPS.values()),
            "seccomp": seccomp.program().hex() if seccomp.supported() else None,
            "rlimits": {"RLIMIT_NPROC": limits.processes + OVERHEAD_PROCESSES, "RLIMIT_AS": limits.memory_bytes,
                        "RLIMIT_FSIZE": limits.disk_bytes, "RLIMIT_CORE": 0},
        }
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", str(ENTER), json.dumps(config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if pty else subprocess.PIPE, stderr=subprocess.DEVNULL if pty else subprocess.STDOUT,
            pass_fds=[theirs.fileno()], start_new_session=True, close_fds=True, cwd="/")
        theirs.close()
        self._launchers.add(launcher)
        try:
            ours.settimeout(self.limits.start_seconds)
            message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        except OSError as exc:
            message, fds = f"error no answer ({exc})".encode(), []
        finally:
            ours.close()
        text = message.decode(errors="replace").strip()
        if not text.startswith("pid "):
            for fd in fds:
                os.close(fd)
            self._reap(launcher)
            raise EnvironmentFailure(f"cannot start {argv[0]!r} in the 'bwrap' environment: "
                                     f"{text.removeprefix('error ') or 'the launcher died'}")
        return launcher, int(text.split()[1]), (fds[0] if fds else None)

    def _reap(self, launcher: subprocess.Popen) -> None:
        tree = _kill_tree(launcher)
        with contextlib.suppress(Exception):
            launcher.wait(timeout=5)
        _wait_gone(tree)
        for stream in (launcher.stdout,):
            if stream is not None:
                stream.close()
        self._launchers.discard(launcher)

    def exec(self, argv: Sequence[str], *, environment: Mapping[str, str] | None = None) -> ScriptResult:
        started = time.monotonic()
        launcher, _, _ = self._enter(argv, environment or ENVIRONMENT, pty=False)
        limits = self.limits
        deadline = started + limits.script_seconds
        chunks: list[bytes] = []
        size = 0
        timed_out = exceeded = False
        stream = launcher.stdout
        os.set_blocking(stream.fileno(), False)
        while True:
            exited = launcher.poll() is not None
            ready, _, _ = select.select([stream], [], [], 0 if exited else min(0.1, max(0.0, deadline - time.monotonic())))
            data = b""
            if ready:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(stream.fileno(), 65536)
            if data:
                chunks.append(data[: max(0, limits.output_bytes - size)])
                size += len(data)
                if size > limits.output_bytes:
                    exceeded = True
                    break
                continue
            if exited or (ready and not data):
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
        if timed_out or exceeded:
            self._reap(launcher)
            code = None
        else:
            code = launcher.wait()
            stream.close()
            self._launchers.discard(launcher)
        return ScriptResult(exit_code=code, output=b"".join(chunks), seconds=time.monotonic() - started,
                            timed_out=timed_out, output_exceeded=exceeded)

    def _open_shell(self) -> Shell:
        launcher, _, master = self._enter(["bash", "--login"], {**ENVIRONMENT, "TERM": "xterm"}, pty=True)
        return Shell(FdChannel(master), limits=self.limits, on_close=lambda: self._reap(launcher))

    # ------------------------------------------------------------ filesystem

    def changes(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        top = self.upper
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                names = sorted(os.listdir(os.path.join(top, rel_dir)))
            except OSError:
                continue
            for name in names:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                path = os.path.join(top, rel)
                try:
                    entry = entry_at(path)
                except OSError:
                    continue
                if listed(rel):
                    found[rel] = entry
                if entry[0] in ("dir", "opaque") and _may_hold(rel, WATCHED):
                    stack.append(rel)
        return found

    def image_entry(self, path: str) -> Entry | None:
        parent = _resolve(self.rootfs, os.path.dirname(path), follow_last=True)
        if parent is None:
            return None
        target = os.path.join(parent, os.path.basename(path))
        if not os.path.lexists(target):
            return None
        return entry_at(target)

    # --------------------------------------------------------------- closing

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        super().close()
        for launcher in list(self._launchers):
            self._reap(launcher)
        process = getattr(self, "process", None)
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        tree = _kill_tree(process)
        with contextlib.suppress(Exception):
            process.wait(timeout=10)
        _wait_gone(tree)
        for stream in (process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if self.ids:
            self.ids.close()
