"""Isolated Linux environments for the OS task: what every back-end provides, and the shell.

An `Environment` is one item's fresh Linux box, made from an image (a Debian rootfs with
AgentBench's packages, env/os-image.sh), with no network and bounded processes, memory,
disk, time and output. Back-ends: `bwrap` (osenv_bwrap.py: bubblewrap, no daemon, no root)
and `docker` (osenv_docker.py: a container through the docker SDK). Each gives:

- `exec(argv)`: a new process in the environment (cwd /, the image's environment), its
  stdout and stderr together, as docker's exec_run returns them; init and check scripts.
- `shell()`: the item's persistent interactive login shell on a terminal (`Shell`), so `cd`,
  variables and background jobs carry over from one command to the next.
- `freeze()`: stop every process of the environment (SIGSTOP), nested pid namespaces included.
- `end_processes()`: kill every process of the environment but its first (the whole pid
  namespace tree, nested user and pid namespaces included), so nothing the agent started can
  act while, or after, the checks inspect it.
- `changes()` / `image_entry(path)`: the entries under the image's system trees (and the
  other places a check's interpreter reads) that differ from the image, and what the image
  has there: the tamper check of the OS task.
- `close()`: remove everything; a worker killed with SIGKILL leaves nothing running either.

The shell speaks to bash over its terminal: each command is sent as one line,
``eval -- $'...'`` (so a multi-line command runs as one unit), and ends when bash prints its
prompt, which is set to a private escape sequence after a report of the working directory
(taken out of the output into `ShellOutput.cwd`). The terminal does not echo input. A
command that outlives `command_seconds`, or prints more than `output_bytes`, gets Ctrl-C;
if no prompt follows within `interrupt_seconds` the shell is hung up and the next command
starts a new login shell in the same environment. Terminal escape sequences are removed as
AgentBench removes them; output arriving between commands (background jobs) comes with the
next command's output.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import logging
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

from cqd_mpi.errors import ConfigError

log = logging.getLogger("cqd_mpi.sandboxes.osenv")

HOSTNAME = "cqd-os"
"""Every environment's host name (AgentBench's is the container id, which is random)."""

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENVIRONMENT = {"PATH": PATH, "HOME": "/root", "HOSTNAME": HOSTNAME}
"""The environment of processes started in an environment: the docker image defaults."""

PROMPT = b"\x1b]777;cqd-prompt\x07"
CWD_REPORT = b"\x1b]778;"
SETUP = ("stty -echo 2>/dev/null; PS1=$'\\e]778;\\\\w\\a\\e]777;cqd-prompt\\a'; PS2=''; PROMPT_COMMAND=''; "
         "unset HISTFILE; set +o history")
"""Sent once to a new shell: no echo, the private prompt, no history of the wrapped lines. The
prompt is the shell's working directory as bash's `\\w` renders it (`~` for $HOME; bash 5.2
shows control characters in it as `^G`, so it holds no BEL or ESC) between CWD_REPORT and BEL,
then the marker PROMPT; the report is taken from the output (`Shell.cwd`)."""

CWD_TAIL_BYTES = 64 << 10
"""How much of the output before a prompt is searched for its working-directory report."""

CLEANUPS = (
    re.compile(rb"\x1b.+@.+[#|$] "),
    re.compile(rb"\x1b\[[0-9;]*[a-zA-Z]"),
    re.compile(rb"\x1b\][0-9]*;[^\x07]*\x07"),
    re.compile(rb"\x1b\[\?2004[hl]"),
    re.compile(rb"\x07"),
)
"""AgentBench's clean-up of a command's terminal output, in its order."""

ACCEPTED_LINE = re.compile(rb"^\r*\n")
"""What readline prints when it accepts the (unechoed) command line."""


@dataclasses.dataclass(frozen=True)
class EnvLimits:
    """Bounds of one environment, on every back-end.

    command_seconds: one shell command (AgentBench: 30 s). script_seconds: one init or check
    script. memory_bytes: the environment's memory (docker: its cgroup; bwrap: each process's
    address space). processes: processes and threads at once. disk_bytes: what the
    environment may write (bwrap: its tmpfs; docker: checked against the container's
    writable layer). output_bytes: read from one command or script. interrupt_seconds: how
    long a command has to stop after Ctrl-C.
    """

    command_seconds: float = 30.0
    script_seconds: float = 60.0
    memory_bytes: int = 1 << 30
    processes: int = 256
    disk_bytes: int = 512 << 20
    inodes: int = 65536
    output_bytes: int = 1 << 20
    interrupt_seconds: float = 2.0
    start_seconds: float = 60.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ConfigError(f"environment limits.{field.name}: expected a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScriptResult:
    """What one `exec` did: the exit code (None when it was killed at its time limit) and its
    stdout and stderr together, cut at the output limit."""

    exit_code: int | None
    output: bytes
    seconds: float
    timed_out: bool = False
    output_exceeded: bool = False


@dataclasses.dataclass(frozen=True)
class ShellOutput:
    """What one shell command printed, cleaned as AgentBench cleans it (`text`) and as the
    terminal wrote it (`raw`: escape sequences and carriage returns kept), and how it ended.
    `cwd`: the shell's working directory after it, as bash's prompt shows it (`\\w`: `~` for
    $HOME); None when the command did not come back to a prompt by itself (it was interrupted
    at a limit, or the shell ended)."""

    text: str
    seconds: float
    timed_out: bool = False
    output_exceeded: bool = False
    shell_ended: bool = False
    raw: str = ""
    cwd: str | None = None


class Channel(Protocol):
    """A shell's terminal, seen from the host: a pty master or a docker exec socket."""

    def fileno(self) -> int: ...
    def recv(self, size: int) -> bytes: ...
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class FdChannel:
    """A pty master file descriptor as a Channel; EIO (the other side hung up) reads as EOF."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        try:
            return os.read(self.fd, size)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ansi_c_quote(text: str) -> str:
    """`text` as a bash $'...' word: bytes outside printable ASCII, quotes and backslashes escaped."""
    out = []
    for byte in text.encode("utf-8", errors="surrogateescape"):
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in "\\'":
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def clean_output(raw: bytes) -> str:
    """A command's terminal bytes as the model reads them: AgentBench's clean-up, then UTF-8
    (undecodable bytes replaced; AgentBench's strict decode would fail the item)."""
    for pattern in CLEANUPS:
        raw = pattern.sub(b"", raw)
    return ACCEPTED_LINE.sub(b"", raw, count=1).decode("utf-8", errors="replace")


class EnvironmentFailure(Exception):
    """A started environment stopped working: its first process is gone, a shell will not
    start, its processes cannot be stopped. The item's error (an agent can cause it), never
    the job's end; BackendUnavailable is for environments that cannot be started at all."""


class ShellError(EnvironmentFailure):
    """A shell could not be started in an environment."""


class Shell:
    """One interactive bash on a terminal; see the module docstring for the protocol."""

    def __init__(self, channel: Channel, *, limits: EnvLimits, on_close: Callable[[], None] | None = None,
                 guard: Callable[[], None] | None = None):
        self.channel = channel
        self.limits = limits
        self.guard = guard
        self.alive = True
        self._on_close = on_close
        self._pending = b""
        self.cwd: str | None = None
        """The working directory the last prompt reported (bash's `\\w`); None before the first
        prompt and after a read that ended without one."""

    def start(self) -> None:
        """Configure the shell and wait for its first prompt; ShellError when it never comes."""
        self.channel.send(SETUP.encode() + b"\n")
        raw, state = self._read(time.monotonic() + self.limits.start_seconds, None, self.limits.output_bytes)
        if state != "prompt":
            self.close()
            raise ShellError(f"the shell did not start within {self.limits.start_seconds:g} s ({state}): "
                             f"{raw[-300:].decode(errors='replace')!r}")

    def run(self, command: str, *, seconds: float | None = None) -> ShellOutput:
        """Run one command for at most `seconds` (at most `command_seconds`, its default); the
        environment's guard is called about every second while it runs, and once after it (it
        raises EnvironmentLimit when the environment passed a limit)."""
        started = time.monotonic()
        limits, guard = self.limits, self.guard
        wait = limits.command_seconds if seconds is None else min(seconds, limits.command_seconds)
        self.channel.send(f"\\builtin eval -- {ansi_c_quote(command)}\n".encode())
        raw, state = self._read(started + wait, guard, limits.output_bytes, stop_when_over=True)
        cwd = self.cwd if state == "prompt" else None
        timed_out, exceeded = state == "timeout", state == "exceeded"
        if timed_out or exceeded:
            held = len(self._pending)
            self.channel.send(b"\x03")
            more, state = self._read(time.monotonic() + limits.interrupt_seconds, guard, limits.output_bytes - len(raw))
            if more[held:held + 2] == b"\r\n":  # the new line bash starts when a job dies of SIGINT
                more = more[:held] + more[held + 2:]
            raw += more
            if state != "prompt":
                raw += self._pending[:max(0, limits.output_bytes - len(raw))]
                self._pending = b""
                self.close()
        if state == "eof":
            self.close()
        if guard is not None:
            guard()
        return ShellOutput(clean_output(raw), time.monotonic() - started, timed_out=timed_out,
                           output_exceeded=exceeded, shell_ended=state == "eof",
                           raw=raw.decode("utf-8", errors="replace"), cwd=cwd)

    def _read(self, deadline: float, guard: Callable[[], None] | None, room: int, *,
              stop_when_over: bool = False) -> tuple[bytes, str]:
        """Read up to the prompt: (output, 'prompt' | 'timeout' | 'exceeded' | 'eof'). At most `room`
        bytes are kept, the rest is read and dropped; what follows the prompt waits for the next call.
        The prompt's working-directory report (the last CWD_REPORT, which ends with the BEL just
        before the marker) is taken out of the output into `self.cwd`; output that forges one comes
        before it, so it changes nothing."""
        kept = bytearray()
        seen = 0
        tail = bytearray()
        window = bytearray(self._pending)
        self._pending = b""
        self.cwd = None
        next_guard = time.monotonic() + 1.0

        def commit(data) -> None:
            nonlocal seen
            take = room - len(kept)
            if take > 0:
                kept.extend(data[:take])
            seen += len(data)
            tail.extend(data)
            if len(tail) > 2 * CWD_TAIL_BYTES:
                del tail[:-CWD_TAIL_BYTES]

        while True:
            found = window.find(PROMPT)
            if found >= 0:
                commit(window[:found])
                self._pending = bytes(window[found + len(PROMPT):])
                start = tail.rfind(CWD_REPORT)
                if start >= 0 and tail.endswith(b"\x07"):
                    self.cwd = tail[start + len(CWD_REPORT):-1].decode("utf-8", errors="replace")
                    del kept[seen - (len(tail) - start):]
                return bytes(kept), "prompt"
            cut = max(0, len(window) - (len(PROMPT) - 1))
            commit(window[:cut])
            del window[:cut]
            if stop_when_over and seen > room:
                self._pending = bytes(window)
                return bytes(kept), "exceeded"
            now = time.monotonic()
            if now >= deadline:
                self._pending = bytes(window)
                return bytes(kept), "timeout"
            if guard is not None and now >= next_guard:
                guard()
                next_guard = now + 1.0
            ready, _, _ = select.select([self.channel], [], [], min(0.2, deadline - now))
            if ready:
                data = self.channel.recv(65536)
                if not data:
                    commit(window)
                    return bytes(kept), "eof"
                window.extend(data)

    def close(self) -> None:
        """Hang up: the shell and its jobs get SIGHUP; what ignores it ends with the environment."""
        if not self.alive:
            return
        self.alive = False
        try:
            self.channel.close()
        finally:
            if self._on_close is not None:
                self._on_close()


Entry = tuple[str, str]
"""A filesystem entry as the tamper check compares it: (kind, value) with kind file (value:
SHA-256), link (its target), dir, gone (deleted), opaque (a dir replaced, its image contents
hidden) or other (value: its mode)."""

WATCHED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc/alternatives", "etc/ld.so.*",
           "etc/python3*", "root/.local/lib/python3*")
"""What the tamper check lists besides the top-level entries (the cwd of every check; see
`listed`), relative to /, fnmatch patterns per prefix: the image's system trees (programs,
libraries, the loader's and Python's files, /usr whole) and the root user's Python site dir."""

NS_GET_PARENT = 0xB702
"""ioctl on a namespace fd: the parent pid namespace (linux/nsfs.h)."""


def in_pid_tree(pid: int, namespace: tuple[int, int], depth: int) -> bool:
    """Whether a host process lives in the pid namespace `namespace` ((st_dev, st_ino)) or one
    nested below it; `depth` is that namespace's NSpid depth (processes no deeper are not in it
    unless it is their own)."""
    try:
        handle = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY)
    except OSError:
        return False
    try:
        info = os.fstat(handle)
        if (info.st_dev, info.st_ino) == namespace:
            return True
        if len(nspid(pid)) <= depth:
            return False
        for _ in range(64):
            try:
                parent = fcntl.ioctl(handle, NS_GET_PARENT)
            except OSError:
                return False
            os.close(handle)
            handle = parent
            info = os.fstat(handle)
            if (info.st_dev, info.st_ino) == namespace:
                return True
        return False
    finally:
        os.close(handle)


def nspid(pid: int) -> list[int]:
    """A process's pid in each nested pid namespace, outermost first ([] when gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return [int(v) for v in line.split()[1:]]
    except OSError:
        pass
    return []


def listed(path: str) -> bool:
    """Whether the tamper check lists a relative path: a top-level entry or one under WATCHED."""
    return "/" not in path or watched(path)


def watched(path: str, patterns: Sequence[str] = WATCHED) -> bool:
    """Whether a relative path lies under one of the patterns (or is one)."""
    parts = path.split("/")
    for pattern in patterns:
        depth = pattern.count("/") + 1
        if len(parts) >= depth and fnmatch.fnmatchcase("/".join(parts[:depth]), pattern):
            return True
    return False


class Environment(abc.ABC):
    """One item's isolated Linux box; see the module docstring. Subclasses start it in __init__."""

    backend: ClassVar[str]

    def __init__(self, *, image: str, limits: EnvLimits):
        self.image = image
        self.limits = limits
        self._shell: Shell | None = None
        self._lock = threading.Lock()
        self.closed = False
        self.shells_started = 0

    @abc.abstractmethod
    def exec(self, argv: Sequence[str], *, environment: Mapping[str, str] | None = None) -> ScriptResult:
        """Run a new process in the environment (cwd /) to its end or its time limit."""

    @abc.abstractmethod
    def _open_shell(self) -> Shell:
        """A new interactive login shell (`bash --login`) on a terminal, not yet started."""

    def shell(self) -> Shell:
        """The item's shell, started on first use and again after it ended."""
        with self._lock:
            if self._shell is None or not self._shell.alive:
                shell = self._open_shell()
                shell.start()
                self._shell = shell
                self.shells_started += 1
            return self._shell

    def guard(self) -> None:
        """Called while a command or script runs and after it; a back-end raises EnvironmentLimit
        when the environment passed a limit that the kernel does not enforce for it."""

    pid_namespace: str
    """The environment's pid namespace (readlink of /proc/PID/ns/pid), set by the back-end."""

    first_pid: int
    """The host pid of the environment's first process (pid 1 inside), set by the back-end."""

    def processes(self) -> dict[int, str]:
        """Host pid -> state letter of every process in the environment, nested pid namespaces
        included (`unshare -Urpf` inside it)."""
        try:
            info = os.stat(f"/proc/{self.first_pid}/ns/pid")
            namespace, depth = (info.st_dev, info.st_ino), len(nspid(self.first_pid))
        except OSError:  # the first process is gone (the agent ended its environment): no tree to walk
            namespace, depth = (-1, -1), 1 << 30
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.readlink(f"/proc/{entry.name}/ns/pid") != self.pid_namespace \
                            and not in_pid_tree(int(entry.name), namespace, depth):
                        continue
                    with open(f"/proc/{entry.name}/stat") as handle:
                        found[int(entry.name)] = handle.read().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
        return found

    def freeze(self) -> None:
        """Stop (SIGSTOP) every process of the environment and wait until all are stopped, so
        none can act any more; processes started afterwards (the checks) run normally."""
        self._signal_all(signal.SIGSTOP, "TtZX", keep_first=False, what="stopped")

    def end_processes(self) -> None:
        """Kill (SIGKILL) every process of the environment but its first, nested pid namespaces
        included, and wait until all are gone: what runs next (the checks) is alone in it."""
        self._signal_all(signal.SIGKILL, "ZX", keep_first=True, what="killed")

    def _signal_all(self, number: int, done: str, *, keep_first: bool, what: str) -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            running = [pid for pid, state in self.processes().items()
                       if state not in done and not (keep_first and pid == self.first_pid)]
            if not running:
                return
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, number)
            time.sleep(0.01)
        raise EnvironmentFailure(f"the processes of a {self.backend} environment could not all be {what} in 10 s")

    @abc.abstractmethod
    def changes(self) -> dict[str, Entry]:
        """Entries under WATCHED that differ from the image in any way (metadata included), by
        relative path; deleted ones as ('gone', '')."""

    @abc.abstractmethod
    def image_entry(self, path: str) -> Entry | None:
        """The image's entry at a relative path, or None."""

    def close(self) -> None:
        """Remove the environment and everything in it; safe to call twice."""
        with self._lock:
            shell, self._shell = self._shell, None
        if shell is not None:
            shell.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EnvironmentLimit(Exception):
    """An environment passed a limit it is checked against while it runs (docker's disk)."""


def digest(data_chunks) -> str:
    import hashlib

    hasher = hashlib.sha256()
    for chunk in data_chunks:
        hasher.update(chunk)
    return hasher.hexdigest()
