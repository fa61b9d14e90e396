"""The OS task's `docker` back-end: a container per item through the docker SDK, as AgentBench runs it.

Images are env/os-image.sh's (`localhost/cqd_mpi-os-default:latest`, a Debian rootfs with
AgentBench's packages) or, where a registry answers, AgentBench's Dockerfiles built under
that tag. A container has no network (`network_mode: none`), a memory cgroup limit of
`memory_bytes` (swap included), a pids limit of `processes`, the engine's default
capabilities, and host name `cqd-os`. Its first process is `bash` reading its stdin from
the worker (containers.start_tied): the container ends and is removed when the worker dies,
SIGKILL included, and stale ones of dead workers are reaped when the next task starts.

The container engine must run on this host: the processes of a container are stopped
(`freeze`) by their host pids, found by the container's pid namespace. The engine's storage
here (overlay on ext4) cannot cap a container's writable layer, so the shell's commands run
under `ulimit -f` (no file larger than `disk_bytes`) and the layer's size is checked about
every second while a command runs and after every command and script: an environment past
`disk_bytes` is stopped and its item ends (EnvironmentLimit).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import signal
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes import containers
from cqd_mpi.sandboxes.osenv import (
    ENVIRONMENT,
    HOSTNAME,
    Entry,
    Environment,
    EnvironmentLimit,
    EnvLimits,
    ScriptResult,
    Shell,
    digest,
    listed,
)

FEATURE = "The OS task's 'docker' back-end"
PURPOSE = "os"
BUILD_HINT = ("Build it with env/os-image.sh (no registry needed) or, where ubuntu can be pulled, from "
              "AgentBench's data/os_interaction/res/dockerfiles under the same tag")


class SocketChannel:
    """A docker exec socket (a raw terminal stream) as a Channel."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except OSError:
            return b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)
        self.sock.close()


class Pristine:
    """Entries of an image as it was built: read from a container of it that runs nothing but its
    first process (running, so the engine keeps its files mounted: ~20x faster look-ups), tied to
    this worker as environments are."""

    def __init__(self, client, image: str):
        self.client = client
        self.image = image
        self._container = None
        self._stdin = None
        self._entries: dict[str, Entry | None] = {}
        self._lock = threading.Lock()

    def entry(self, path: str) -> Entry | None:
        with self._lock:
            if path not in self._entries:
                if self._container is None:
                    self._container, self._stdin = containers.start_tied(
                        self.client, self.image, purpose=PURPOSE, command=["bash"], hostname=HOSTNAME,
                        environment=dict(ENVIRONMENT), host_config={"network_mode": "none"})
                self._entries[path] = archive_entry(self._container, path)
            return self._entries[path]

    def close(self) -> None:
        with self._lock:
            container, self._container = self._container, None
            stdin, self._stdin = self._stdin, None
        if stdin is not None:
            with contextlib.suppress(Exception):
                stdin.close()
        if container is not None:
            containers.remove(container)


def archive_entry(container, path: str) -> Entry | None:
    """The Entry at /path in a container, from the engine's archive of it (None when absent)."""
    docker = containers.docker_module(FEATURE)
    api = container.client.api
    head = api.head(api._url("/containers/{0}/archive", container.id), params={"path": "/" + path})
    if head.status_code == 404:
        return None
    stat = json.loads(base64.b64decode(head.headers.get("X-Docker-Container-Path-Stat") or "e30="))
    mode = int(stat.get("mode", 0))
    if mode & (1 << 27):  # a symlink (Go's ModeSymlink): the archive would hold what it points to
        return "link", str(stat.get("linkTarget", ""))
    if mode & (1 << 31):  # a directory: its archive would hold the whole tree
        return "dir", ""
    try:
        stream, _ = container.get_archive("/" + path)
    except docker.errors.NotFound:
        return None
    data = io.BytesIO(b"".join(stream))
    with tarfile.open(fileobj=data) as archive:
        member = archive.next()
        if member is None:
            return None
        if member.issym():
            return "link", member.linkname
        if member.isfile():
            handle = archive.extractfile(member)
            return "file", digest(iter(lambda: handle.read(1 << 20), b""))
        if member.isdir():
            return "dir", ""
        return "other", oct(member.mode)


class DockerEnvironment(Environment):
    """One item's container; see the module docstring."""

    backend = "docker"

    def __init__(self, *, client, image: str, tag: str, limits: EnvLimits, pristine: Pristine):
        super().__init__(image=image, limits=limits)
        self.client = client
        self.tag = tag
        self.pristine = pristine
        self.container = None
        self._stdin = None
        self._shells: list = []
        memory = str(limits.memory_bytes)
        try:
            self.container, self._stdin = containers.start_tied(
                client, tag, purpose=PURPOSE, command=["bash"], hostname=HOSTNAME, environment=dict(ENVIRONMENT),
                host_config={"network_mode": "none", "mem_limit": memory, "memswap_limit": memory,
                             "pids_limit": limits.processes})
            pid = int(self.container.attrs["State"]["Pid"])
            self.pid_namespace = os.readlink(f"/proc/{pid}/ns/pid")
            self.first_pid = pid
        except OSError as exc:
            self.close()
            raise BackendUnavailable(f"{FEATURE} needs a container engine on this host (it stops an item's processes "
                                     f"by their host pids before the checks), but the container's first process is "
                                     f"not visible here ({exc})") from exc
        except Exception as exc:
            self.close()
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable(f"{FEATURE}: cannot start a container of {tag!r}: {exc}") from exc

    def exec(self, argv: Sequence[str], *, environment: Mapping[str, str] | None = None) -> ScriptResult:
        started = time.monotonic()
        api = self.client.api
        created = api.exec_create(self.container.id, list(argv), stdout=True, stderr=True, stdin=False, tty=False,
                                  environment=dict(environment or ENVIRONMENT), workdir="/")
        sock = api.exec_start(created["Id"], socket=True)._sock
        deadline = started + self.limits.script_seconds
        chunks, size = [], 0
        timed_out = exceeded = False
        buffer = b""
        with contextlib.closing(sock):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                ready, _, _ = select.select([sock], [], [], min(0.5, remaining))
                if not ready:
                    continue
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
                while len(buffer) >= 8:
                    length = int.from_bytes(buffer[4:8], "big")
                    if len(buffer) < 8 + length:
                        break
                    frame, buffer = buffer[8:8 + length], buffer[8 + length:]
                    chunks.append(frame[: max(0, self.limits.output_bytes - size)])
                    size += len(frame)
                if size > self.limits.output_bytes:
                    exceeded = True
                    break
        code = None
        if timed_out or exceeded:
            self._kill_exec(created["Id"])
        else:
            code = self._exit_code(created["Id"], deadline)
            timed_out = code is None
        self.guard()
        return ScriptResult(exit_code=code, output=b"".join(chunks), seconds=time.monotonic() - started,
                            timed_out=timed_out, output_exceeded=exceeded)

    def _exit_code(self, exec_id: str, deadline: float) -> int | None:
        """The exit code once the engine has recorded it: its output stream can close first."""
        while True:
            info = self.client.api.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() >= deadline:
                self._kill_exec(exec_id)
                return None
            time.sleep(0.02)

    def _kill_exec(self, exec_id: str) -> None:
        with contextlib.suppress(Exception):
            pid = self.client.api.exec_inspect(exec_id).get("Pid")
            if pid:
                os.kill(int(pid), signal.SIGKILL)

    def _open_shell(self) -> Shell:
        api = self.client.api
        created = api.exec_create(self.container.id, ["bash", "--login"], stdin=True, tty=True,
                                  environment={**ENVIRONMENT, "TERM": "xterm"}, workdir="/")
        sock = api.exec_start(created["Id"], socket=True, tty=True)._sock
        return Shell(SocketChannel(sock), limits=self.limits, on_close=lambda: self._kill_exec(created["Id"]),
                     guard=self.guard)

    def shell(self) -> Shell:
        started = self.shells_started
        shell = super().shell()
        if self.shells_started != started:
            shell.run(f"ulimit -f {max(1, self.limits.disk_bytes // 1024)}")
        return shell

    def guard(self) -> None:
        size = self._writable_size()
        if size is not None and size > self.limits.disk_bytes:
            self.freeze()
            raise EnvironmentLimit(f"the environment wrote {size} bytes, past its disk limit of "
                                   f"{self.limits.disk_bytes}; it was stopped")

    def _writable_size(self) -> int | None:
        api = self.client.api
        with contextlib.suppress(Exception):
            info = api._result(api._get(api._url("/containers/{0}/json", self.container.id), params={"size": 1}), True)
            return int(info.get("SizeRw") or 0)
        return None

    def changes(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for change in self.container.diff() or []:
            rel = change["Path"].lstrip("/")
            if not listed(rel):
                continue
            if change["Kind"] == 2:
                found[rel] = ("gone", "")
                continue
            entry = archive_entry(self.container, rel) or ("other", "unreadable")  # e.g. a dangling link
            if entry == ("dir", "") and self.pristine.entry(rel) == ("dir", ""):
                continue
            found[rel] = entry
        return found

    def image_entry(self, path: str) -> Entry | None:
        return self.pristine.entry(path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        super().close()
        if self._stdin is not None:
            with contextlib.suppress(Exception):
                self._stdin.close()
        if self.container is not None:
            containers.remove(self.container)
