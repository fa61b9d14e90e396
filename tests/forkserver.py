"""A fork server for the tests' `python -m cqd_mpi ...` commands: each pytest worker starts one
process that imports torch, transformers and cqd_mpi once, and forks a fresh child per command.

Why: a tiny run spends about 4 s of CPU importing torch and transformers and about 1.3 s working,
and the suite starts about a hundred of them on two cores. The child is the command as a
subprocess would run it: its own pid, the request's argv, environment and working directory, its
own stdin, stdout and stderr (passed over the socket), and the exit status or signal it ends
with. What the preloaded modules read from the environment when they are imported cannot change
in a child, so a request whose environment differs from the server's in such a variable
(IMPORT_TIME_PREFIXES) runs as a plain subprocess instead, and so do commands under mpiexec.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Variables read when torch, transformers, huggingface_hub or Python itself start up.
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA", "HF_", "HUGGINGFACE",
                        "TRANSFORMERS", "TOKENIZERS", "PYTHON", "LD_", "MALLOC", "GLIBC", "NUMEXPR")
PRELOAD = ("torch", "numpy", "yaml", "h5py", "safetensors.torch", "transformers",
           "transformers.models.llama.modeling_llama", "cqd_mpi.cli", "cqd_mpi.commands.run",
           "cqd_mpi.runtime.mpi", "cqd_mpi.engines.hf", "cqd_mpi.merging.builder")


def _import_time_env(env: dict) -> dict:
    """What the preloaded modules would read at import in a process started with `env`: its
    import-time variables, with cqd_mpi.cli's defaults (which `main` sets before any import)."""
    from cqd_mpi.cli import ENVIRONMENT_DEFAULTS

    env = {**ENVIRONMENT_DEFAULTS, **env}
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_PREFIXES)}


# ---------------------------------------------------------------------------------------------
# The server: `python -m tests.forkserver SOCKET`, started with the environment it serves.

def _child(request: dict, fds: list[int], closing: list) -> None:
    """In the forked child: become the command (its fds at the numbers it had, its directory,
    environment and argv) and run it. Its SystemExit or exception leaves through the server's
    frames to the interpreter's own exit, so the child ends as `python -m cqd_mpi` would:
    atexit, mpi4py's MPI_Finalize and the C library's exit handlers (MPICH's PMI finalize) run."""
    try:
        signal.set_wakeup_fd(-1)
        for thing in closing:
            os.close(thing) if isinstance(thing, int) else thing.close()
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 256) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in zip(request["fds_at"], high):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-m", *request["args"]]
    except BaseException:
        os._exit(70)  # never back into the server's loop
    import runpy

    runpy.run_module(request.get("module", "cqd_mpi"), run_name="__main__", alter_sys=True)
    sys.exit(0)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A request: a length line and the JSON after it, the fds on the first message."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 16)
    while b"\n" not in data:
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the request ended early")
        data += more
    length, _, body = data.partition(b"\n")
    while len(body) < int(length):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the request ended early")
        body += more
    return json.loads(body), fds


def serve(path: str) -> None:
    """Preload, then fork a child per request. The status goes back on the request's connection
    (its pid first); a connection closed before its child ended (its client was killed) kills the
    child, as a killed rank's launcher would."""
    from cqd_mpi.cli import ENVIRONMENT_DEFAULTS

    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    Path(path + ".ready").touch()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    running: dict[int, socket.socket] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [selector, listener, conn, *running.values(), wake_read, wake_write])
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    conn.sendall(f"{pid}\n".encode())
                running[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
            elif key.fileobj is wake_read:
                os.read(wake_read, 4096)
            else:  # a client's connection: nothing is sent after the request, so this is its end
                with contextlib.suppress(OSError):
                    if not key.fileobj.recv(1):
                        selector.unregister(key.fileobj)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(key.data, signal.SIGKILL)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(conn)
                with contextlib.suppress(OSError):
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    body = json.dumps(request).encode()
    message = f"{len(body)}\n".encode() + body
    sent = socket.send_fds(sock, [message], fds)
    sock.sendall(message[sent:])


# ---------------------------------------------------------------------------------------------
# The client, in the pytest worker.

def _text(chunks: list[bytes]) -> str:
    """What text=True reads: the locale's decoding with universal newlines."""
    return b"".join(chunks).decode().replace("\r\n", "\n").replace("\r", "\n")


class ForkServer:
    """One server process, started on first use with the environment `env`."""

    def __init__(self, env: dict):
        self.env = dict(env)
        self.directory = tempfile.mkdtemp(prefix="cqd-forkserver-")
        self.path = os.path.join(self.directory, "socket")
        self.log = os.path.join(self.directory, "log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.path], env=self.env,
                                            cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)
        atexit.register(self.close)

    def serves(self, env: dict) -> bool:
        return self.serves_env(self.env, env)

    @staticmethod
    def serves_env(server_env: dict, env: dict) -> bool:
        return _import_time_env(env) == _import_time_env(server_env)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the server listens (it imports torch and transformers first)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path + ".ready"):
            if self.process.poll() is not None:
                raise RuntimeError(f"the tests' fork server ended with {self.process.returncode}: "
                                   f"{Path(self.log).read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tests' fork server did not start within {timeout} s")
            time.sleep(0.05)

    def _connect(self) -> socket.socket:
        self.wait_ready()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock

    def run(self, command: list[str], args: list[str], *, env: dict, cwd: str | None,
            timeout: float | None, module: str = "cqd_mpi") -> subprocess.CompletedProcess:
        """`python -m MODULE ARGS` in a forked child, as subprocess.run(..., capture_output=True,
        text=True) would return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self._connect()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            request = {"module": module, "args": args, "env": env, "cwd": cwd or os.getcwd(), "fds_at": [0, 1, 2]}
            send_request(sock, request, [stdin, out_write, err_write])
        finally:
            for fd in (stdin, out_write, err_write):
                os.close(fd)
        chunks = {out_read: [], err_read: []}
        replies = b""
        selector = selectors.DefaultSelector()
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        pid = None
        try:
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(command, timeout, b"".join(chunks[out_read]),
                                                    b"".join(chunks[err_read]))
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 65536) if key.fileobj is not sock else sock.recv(4096)
                    if not data:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is sock:
                        replies += data
                        if pid is None and b"\n" in replies:
                            pid = int(replies.split(b"\n")[0])
                    else:
                        chunks[key.fd].append(data)
        finally:
            selector.close()
            for fd in chunks:
                os.close(fd)
            sock.close()
        lines = replies.split(b"\n")
        if len(lines) < 3:
            raise RuntimeError(f"the tests' fork server gave no exit status for {command}: {replies!r}")
        return subprocess.CompletedProcess(command, int(lines[1]), _text(chunks[out_read]), _text(chunks[err_read]))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        try:
            import shutil

            shutil.rmtree(self.directory)
        except OSError:
            pass


_server: ForkServer | None = None


def server_for(env: dict) -> ForkServer | None:
    """This worker's fork server where it serves `env`, else None; None always under
    CQD_TEST_FORKSERVER=0, which runs every command as a plain subprocess. The server starts on
    first use, and starts again when this worker's own environment has changed what a command
    would read at import (a test's session fixture sets HF_DATASETS_OFFLINE; cqd_mpi.cli.main,
    called in-process, sets its defaults)."""
    global _server
    if os.environ.get("CQD_TEST_FORKSERVER", "1") == "0":
        return None
    from tests.conftest import subprocess_env

    if _server is not None and _server.serves(env):
        return _server
    baseline = subprocess_env()
    if not ForkServer.serves_env(baseline, env):
        return None  # this command's own variables: a plain process
    if _server is not None:
        _server.close()
    _server = ForkServer(baseline)
    return _server


def run_cqd(args: list[str], *, env: dict, mpi_ranks: int | None = None, timeout: float | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m cqd_mpi ARGS` with captured text output, under `mpiexec -n RANKS` when mpi_ranks
    is given: its processes forked from this worker's fork server where it serves `env`, else
    plain processes."""
    server = server_for(env)
    if os.environ.get("CQD_TEST_FORKSERVER_LOG"):  # which commands were forked: a line each
        with open(os.environ["CQD_TEST_FORKSERVER_LOG"], "a") as log:
            log.write(f"{'forked' if server else 'plain'} {mpi_ranks} {' '.join(args[:1])}\n")
    command = [sys.executable, "-m", "cqd_mpi", *args]
    if mpi_ranks is not None:
        if server is not None:
            server.wait_ready()
            command = [sys.executable, "-S", str(Path(__file__).with_name("forkclient.py")), server.path, *args]
        command = ["mpiexec", "-n", str(mpi_ranks), *command]
    elif server is not None:
        return server.run(command, list(args), env=env, cwd=None, timeout=timeout)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    serve(sys.argv[1])
