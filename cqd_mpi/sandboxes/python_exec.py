"""Run untrusted Python in a throwaway sandbox: no network, read-only system, bounded time, memory and output.

Each run is a child process under bubblewrap (``bwrap``: new network, pid, ipc and uts
namespaces, read-only binds of the Python install, an empty tmpfs as the working dir, killed
with its parent) or, where bwrap is missing, under ``unshare`` with the same namespaces and a
bootstrap that remounts the whole filesystem read-only and hides /tmp, /run, /home... under
fresh tmpfs. Inside, `bootstrap.py` sets the rlimits (address space, processes, file size,
CPU time) and, when the host runs as root, drops to an otherwise unused uid so the process
limit counts only this sandbox, then installs a seccomp filter that denies new user
namespaces (where code would hold every capability). The host enforces a wall-clock timeout that kills the whole
process tree and caps what it reads from stdout and stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from cqd_mpi.errors import BackendUnavailable, ConfigError

SandboxKind = Literal["auto", "bwrap", "unshare"]

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
READY = b"cqd-sandbox-ready\n"
SANDBOX_DIR = "/sandbox"
WORK_DIR = "/tmp/work"
SANDBOX_UID_BASE = 1_500_000_000
"""Root hosts run each sandbox as a fresh uid from here up, owning no file and no other process."""

_uid_counter = itertools.count()
_uid_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource bounds of one sandboxed run."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    processes: int = 16
    file_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    stdout_bytes: int = 8 << 20
    stderr_bytes: int = 64 << 10

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ConfigError(f"sandbox limits.{field.name}: expected a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What one sandboxed run did. `started` is False when the sandbox itself failed to come up."""

    started: bool
    returncode: int | None
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False
    output_exceeded: bool = False

    @property
    def killed_by(self) -> signal.Signals | None:
        """The signal that ended the sandboxed program, if any (bwrap reports 128 + signal)."""
        code = self.returncode
        if code is None:
            return None
        number = -code if code < 0 else code - 128 if code > 128 else 0
        try:
            return signal.Signals(number) if number else None
        except ValueError:
            return None


def _python_roots() -> list[str]:
    """Host dirs the sandboxed interpreter needs: its prefixes and site-packages dirs."""
    import site

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    for entry in site.getsitepackages():
        if os.path.isdir(entry):
            roots.add(entry)
    roots = {os.path.realpath(root) for root in roots}
    ordered = sorted(roots, key=len)
    kept: list[str] = []
    for root in ordered:
        if not any(root == k or root.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(root)
    return kept


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32")


def _under(path: str, roots) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def _system_binds() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_DIRS[1:]:
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    for name in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        if os.path.exists(name):
            args += ["--ro-bind", name, name]
    return args


def _parents(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _tasks_of_uid(uid: int) -> int:
    """Processes and threads the kernel counts against RLIMIT_NPROC for `uid`."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


def _next_sandbox_uid() -> int:
    with _uid_lock:
        serial = next(_uid_counter)
    return SANDBOX_UID_BASE + (os.getpid() % 50_000) * 10_000 + serial % 10_000


class PythonSandbox:
    """Runs a Python script from the host in a fresh sandbox per call; see the module docstring."""

    def __init__(self, *, kind: SandboxKind = "auto", limits: SandboxLimits | None = None):
        if kind not in ("auto", "bwrap", "unshare"):
            raise ConfigError(f"sandbox: expected 'auto', 'bwrap' or 'unshare', got {kind!r}")
        self.requested = kind
        self.limits = limits or SandboxLimits()
        self.is_root = os.geteuid() == 0
        self._kind: str | None = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        """The mechanism in use ('bwrap' or 'unshare'); probes on first use, raises BackendUnavailable."""
        with self._lock:
            if self._kind is None:
                self._kind = self._choose()
            return self._kind

    def _choose(self) -> str:
        candidates = ["bwrap", "unshare"] if self.requested == "auto" else [self.requested]
        problems = []
        for candidate in candidates:
            problem = self._probe(candidate)
            if problem is None:
                return candidate
            problems.append(f"{candidate}: {problem}")
        raise BackendUnavailable(
            "no working Python sandbox ("
            + "; ".join(problems)
            + "). Install bubblewrap (apt-get install bubblewrap) or allow user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1)"
        )

    def _probe(self, kind: str) -> str | None:
        if shutil.which(kind) is None:
            return f"'{kind}' is not on PATH"
        with tempfile.TemporaryDirectory(prefix="cqd-probe-") as tmp:
            script = Path(tmp) / "probe.py"
            script.write_text("import socket, os\nprint('probe-ok', os.getcwd())\n")
            result = self._run(kind, script, stdin=b"", args=(), env={}, limits=SandboxLimits(wall_seconds=30))
        if result.started and result.returncode == 0 and b"probe-ok" in result.stdout:
            return None
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        return f"test run failed (exit {result.returncode}): {detail[-1] if detail else 'no message'}"

    def check(self) -> tuple[bool, str]:
        """(works, message) for `doctor`; never raises."""
        try:
            return True, f"{self.kind} sandbox works"
        except BackendUnavailable as exc:
            return False, str(exc)

    def run(
        self,
        script: str | os.PathLike,
        *,
        stdin: bytes = b"",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> ExecResult:
        """Run the host file `script` in a fresh sandbox with `stdin`; never raises for what the script does."""
        script = Path(script).resolve()
        if not script.is_file():
            raise ConfigError(f"sandbox: script {script} does not exist")
        return self._run(self.kind, script, stdin=stdin, args=args, env=dict(env or {}), limits=limits or self.limits)

    # ---------------------------------------------------------------- internals

    def _bootstrap_config(self, *, script: str, args: Sequence[str], limits: SandboxLimits, seal: bool) -> str:
        import json

        rlimits = {
            "RLIMIT_AS": limits.memory_bytes,
            "RLIMIT_CPU": int(limits.cpu_seconds),
            "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_CORE": 0,
        }
        uid = gid = None
        if self.is_root:
            uid = gid = _next_sandbox_uid()
            rlimits["RLIMIT_NPROC"] = limits.processes
        else:
            rlimits["RLIMIT_NPROC"] = _tasks_of_uid(os.getuid()) + limits.processes
        config = {
            "script": script,
            "args": list(args),
            "work_dir": WORK_DIR,
            "limits": rlimits,
            "uid": uid,
            "gid": gid,
            "seal": seal,
            "init": seal,
            "keep": _python_roots(),
            "tmpfs_bytes": limits.tmpfs_bytes,
        }
        return json.dumps(config)

    def _environment(self, env: Mapping[str, str]) -> dict[str, str]:
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": WORK_DIR,
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TMPDIR": WORK_DIR,
        }
        base.update(env)
        return base

    def _command(self, kind: str, script: Path, args: Sequence[str], env: Mapping[str, str], limits: SandboxLimits) -> list[str]:
        python = sys.executable
        if kind == "bwrap":
            if self.is_root:
                namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                              "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                              "--cap-add", "CAP_SETGID"]
            else:
                namespaces = ["--unshare-all"]
            command = ["bwrap", *namespaces, "--die-with-parent", "--new-session", "--clearenv"]
            for key, value in self._environment(env).items():
                command += ["--setenv", key, value]
            command += _system_binds()
            command += ["--proc", "/proc", "--dev", "/dev",
                        "--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
                        "--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", "/dev/shm"]
            roots = [root for root in _python_roots() if not _under(root, SYSTEM_DIRS)]
            made: set[str] = {"/tmp", "/dev", "/dev/shm", "/proc"}
            for root in [*roots, SANDBOX_DIR + "/x"]:
                for parent in _parents(root):
                    if parent not in made:
                        command += ["--perms", "0755", "--dir", parent]
                        made.add(parent)
            for root in roots:
                command += ["--ro-bind", root, root]
            command += ["--ro-bind", str(BOOTSTRAP), f"{SANDBOX_DIR}/bootstrap.py",
                        "--ro-bind", str(script), f"{SANDBOX_DIR}/{script.name}",
                        "--chdir", "/"]
            config = self._bootstrap_config(script=f"{SANDBOX_DIR}/{script.name}", args=args, limits=limits, seal=False)
            return [*command, python, "-I", "-B", f"{SANDBOX_DIR}/bootstrap.py", config]
        namespaces = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
        if not self.is_root:
            namespaces = ["--user", "--map-root-user", *namespaces]
        config = self._bootstrap_config(script=str(script), args=args, limits=limits, seal=True)
        environment = [f"{key}={value}" for key, value in self._environment(env).items()]
        return ["unshare", *namespaces, "env", "-i", *environment, python, "-I", "-B", str(BOOTSTRAP), config]

    def _run(self, kind: str, script: Path, *, stdin: bytes, args: Sequence[str], env: dict, limits: SandboxLimits) -> ExecResult:
        command = self._command(kind, script, args, env, limits)
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                cwd="/",
            )
        except OSError as exc:
            return ExecResult(False, None, b"", str(exc).encode(), time.monotonic() - start)
        writer = threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True)
        writer.start()
        stdout, stderr, timed_out, exceeded, tree = _collect(process, start + limits.wall_seconds, limits)
        returncode = process.wait()
        _wait_gone(tree)
        seconds = time.monotonic() - start
        writer.join(timeout=1.0)
        started = stdout.startswith(READY)
        if started:
            stdout = stdout[len(READY):]
        return ExecResult(started, returncode, stdout, stderr, seconds, timed_out, exceeded)


def _feed(pipe, data: bytes) -> None:
    with contextlib.suppress(OSError):
        if data:
            pipe.write(data)
    with contextlib.suppress(OSError):
        pipe.close()


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process on the host."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in _process_table().items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _kill_tree(process: subprocess.Popen) -> set[int]:
    """SIGKILL the sandbox's process group and every descendant (some run in their own session)."""
    tree = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return tree


def _wait_gone(pids: set[int], timeout: float = 5.0) -> None:
    """Block until none of `pids` is alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        table = _process_table()
        pids = {pid for pid in pids if pid in table and table[pid][1] != "Z"}
        if pids:
            time.sleep(0.005)


def _collect(process: subprocess.Popen, deadline: float, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool, set[int]]:
    """Read stdout and stderr up to their caps until both close or the deadline passes.

    Returns both streams, whether the deadline passed or a cap was hit, and the pids killed.
    """
    caps = {process.stdout: limits.stdout_bytes + len(READY), process.stderr: limits.stderr_bytes}
    chunks: dict = {process.stdout: [], process.stderr: []}
    sizes = dict.fromkeys(chunks, 0)
    timed_out = exceeded = False
    with selectors.DefaultSelector() as selector:
        for stream in chunks:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                stream = key.fileobj
                room = caps[stream] - sizes[stream]
                chunks[stream].append(data[:room])
                sizes[stream] += len(data)
                if sizes[stream] > caps[stream]:
                    exceeded = True
            if exceeded:
                break
    killed: set[int] = set()
    if not (timed_out or exceeded):
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or exceeded:
        killed = _kill_tree(process)
    for stream in chunks:
        stream.close()
    return b"".join(chunks[process.stdout]), b"".join(chunks[process.stderr]), timed_out, exceeded, killed
