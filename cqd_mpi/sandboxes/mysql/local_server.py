"""The `local` back-end: a throwaway mariadbd/mysqld on a free port with a temp datadir,
stopped and deleted on close, also when its worker dies."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes.mysql.dsn import Address
from cqd_mpi.sandboxes.mysql.server import MySQLServer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_server_binary(binary: str | None = None) -> Path:
    """The mariadbd/mysqld to start: `binary` (a path or a name), else mariadbd or mysqld on PATH or in /usr/sbin."""
    candidates = [binary] if binary else ["mariadbd", "mysqld"]
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin"])
    for candidate in candidates:
        found = shutil.which(candidate, path=search) if os.sep not in candidate else candidate
        if found and os.access(found, os.X_OK):
            return Path(found)
    what = f"{binary!r}" if binary else "mariadbd or mysqld"
    raise BackendUnavailable(
        f"MySQL back-end 'local': cannot find the server binary {what} on PATH or in /usr/sbin; "
        "install mariadb-server (or give settings.server.binary)"
    )


def _install_tool(binary: Path) -> Path | None:
    search = os.pathsep.join([str(binary.parent), str(binary.parent.parent / "bin"), os.environ.get("PATH", "")])
    for name in ("mariadb-install-db", "mysql_install_db"):
        found = shutil.which(name, path=search)
        if found:
            return Path(found)
    return None


SUPERVISOR = r"""
dir=$1 extra=$2
shift 2
exec 3<&0 0</dev/null
"$@" &
server=$!
(read -r _ <&3; : >"$dir/.stop"; kill -TERM "$server" 2>/dev/null) &
watcher=$!
wait "$server"
status=$?
if [ -e "$dir/.stop" ]; then
    rm -rf "$dir" ${extra:+"$extra"}
else
    kill "$watcher" 2>/dev/null
fi
exit "$status"
"""
"""Runs the local server as its child and stops it, then deletes its directories, as soon as
its stdin pipe closes: on close(), and also when the Python process dies without cleaning up
(SIGKILL, a SLURM time limit), so no server outlives its worker."""


def _stop_local(state: dict) -> None:
    """Stop a local server and delete its directories (also run at interpreter exit)."""
    process = state.get("process")
    if process is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(state["directories"][0], "mysqld.pid").read_text().strip()), signal.SIGKILL)
            process.kill()
            process.wait(timeout=10)
    for directory in state.get("directories", ()):
        shutil.rmtree(directory, ignore_errors=True)


class LocalServer(MySQLServer):
    """A throwaway mariadbd/mysqld on a free port with a temp datadir, stopped (and deleted) on close.

    The data is disposable, so the server skips durability (no log flush at commit, no
    doublewrite, no fsync on MariaDB): DDL-heavy item setup is several times faster.
    """

    backend = "local"

    def __init__(self, *, binary: str | None = None, attempts: int = 6, backoff_s: float = 0.5,
                 startup_timeout_s: float = 120.0, temp_dir: str | None = None):
        self.binary = find_server_binary(binary)
        self.directory = tempfile.mkdtemp(prefix="cqd-mysqld-", dir=temp_dir)
        self._state: dict[str, Any] = {"process": None, "directories": [self.directory]}
        self._finalizer = weakref.finalize(self, _stop_local, self._state)
        socket_path = os.path.join(self.directory, "mysqld.sock")
        if len(socket_path) > 100:
            short = tempfile.mkdtemp(prefix="cqd-sock-", dir="/tmp")
            self._state["directories"].append(short)
            socket_path = os.path.join(short, "mysqld.sock")
        super().__init__(address=Address(host="127.0.0.1", port=0, user="root", unix_socket=socket_path),
                         attempts=attempts, backoff_s=backoff_s)
        try:
            self._initialize()
            self._start(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def process(self) -> subprocess.Popen | None:
        """The supervising shell (see SUPERVISOR); the server is its child."""
        return self._state["process"]

    @property
    def pid(self) -> int:
        """The server's process id, from its pid file."""
        return int(Path(self.directory, "mysqld.pid").read_text().strip())

    def _server_flavor(self) -> str:
        try:
            out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(f"MySQL back-end 'local': cannot run {self.binary} --version: {exc}") from exc
        return "mariadb" if "mariadb" in (out.stdout + out.stderr).lower() else "mysql"

    def _user_args(self) -> list[str]:
        return [f"--user={pwd.getpwuid(os.geteuid()).pw_name}"] if os.geteuid() == 0 else []

    def _tmpdir(self) -> str:
        """The server's own tmpdir: a starting server deletes every '#sql*' file in its tmpdir,
        so servers sharing /tmp would delete each other's temporary tables."""
        path = os.path.join(self.directory, "tmp")
        os.makedirs(path, exist_ok=True)
        return path

    def _initialize(self) -> None:
        datadir = os.path.join(self.directory, "data")
        log_path = os.path.join(self.directory, "install.log")
        self.binary_flavor = self._server_flavor()
        if self.binary_flavor == "mariadb":
            tool = _install_tool(self.binary)
            if tool is None:
                raise BackendUnavailable(
                    f"MySQL back-end 'local': found {self.binary} but not mariadb-install-db or "
                    "mysql_install_db next to it or on PATH"
                )
            command = [str(tool), "--no-defaults", f"--datadir={datadir}", "--skip-test-db",
                       "--auth-root-authentication-method=normal", *self._user_args()]
            if self.binary.parent not in (Path("/usr/sbin"), Path("/usr/bin")):
                command.append(f"--basedir={self.binary.parent.parent}")
        else:
            command = [str(self.binary), "--no-defaults", "--initialize-insecure", f"--datadir={datadir}",
                       *self._user_args()]
        with open(log_path, "wb") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=300,
                                    env={**os.environ, "TMPDIR": self._tmpdir()})
        if result.returncode != 0:
            raise BackendUnavailable(
                f"MySQL back-end 'local': initializing a datadir with {command[0]} failed "
                f"(exit {result.returncode}): {Path(log_path).read_text(errors='replace')[-1500:]}"
            )

    def _start(self, timeout_s: float) -> None:
        datadir = os.path.join(self.directory, "data")
        error_log = os.path.join(self.directory, "error.log")
        for _attempt in range(3):
            port = _free_port()
            self.address = dataclasses.replace(self.address, port=port)
            command = [
                str(self.binary), "--no-defaults", f"--datadir={datadir}", f"--port={port}",
                "--bind-address=127.0.0.1", f"--socket={self.address.unix_socket}",
                f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}", f"--log-error={error_log}",
                f"--tmpdir={self._tmpdir()}", "--skip-name-resolve", "--character-set-server=utf8mb4",
                "--max-connections=1000", "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", *self._user_args(),
            ]
            if self.binary_flavor == "mariadb":
                command.append("--innodb-flush-method=nosync")
            extra = "" if len(self._state["directories"]) < 2 else self._state["directories"][1]
            with open(os.path.join(self.directory, "stdout.log"), "ab") as out:
                process = subprocess.Popen(["/bin/sh", "-c", SUPERVISOR, "cqd-mysqld", self.directory, extra, *command],
                                           stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            self._state["process"] = process
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    self.connect(attempts=1).close()
                    return
                except BackendUnavailable:
                    time.sleep(0.1)
            text = Path(error_log).read_text(errors="replace")[-1500:] if os.path.exists(error_log) else ""
            if process.poll() is None:
                raise BackendUnavailable(
                    f"{self.describe()}: {self.binary} did not accept connections within {timeout_s:.0f} s; "
                    f"its log: {text}"
                )
            if "already in use" not in text:
                raise BackendUnavailable(f"{self.describe()}: {self.binary} exited with status {process.returncode}: {text}")
        raise BackendUnavailable(f"{self.describe()}: no free port could be bound in 3 tries")

    def close(self) -> None:
        super().close()
        self._finalizer()
