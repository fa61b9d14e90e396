"""MySQL-compatible servers for the DB task, and one isolated database per item.

Back-ends (`ServerSettings.backend`):
- `external`: a server that already runs (host/port/user/password or a DSN).
- `local`: a throwaway mariadbd or mysqld on a free port with a temp datadir, stopped on close;
  for nodes without a container engine.
- `docker`: a container of a MySQL-compatible image through the docker SDK, as AgentBench does.
  podman's Docker-compatible socket works (env/podman-service.sh); env/mariadb-image.sh builds
  the default image without a registry, env/Dockerfile.mysql builds it from `mysql`.

An `ItemDatabase` is one item's sandbox: a database with a unique name and a dedicated user
whose grants cover that database only (no FILE, PROCESS, SUPER, GRANT OPTION, so no LOAD DATA
INFILE, SHUTDOWN, GRANT, or reading other databases and mysql.*). Each statement runs on a fresh
connection, as AgentBench v0.2 reconnects before each one; the client never enables
CLIENT_MULTI_STATEMENTS or LOCAL INFILE, so multiple statements and client files are refused
by the server. Statements have a time limit set in the session (MariaDB max_statement_time,
MySQL max_execution_time) and backed by a watchdog that kills the connection, since a statement
can lift its own session limit. Results are read row by row and cut at AgentBench's 800
characters, so a huge result is never fetched whole.

A server that cannot be reached is retried with exponential backoff, then `BackendUnavailable`
names the back-end and its address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from cqd_mpi.errors import BackendUnavailable, ConfigError, require
from cqd_mpi.sandboxes import containers

log = logging.getLogger("cqd_mpi.sandboxes.mysql")

FEATURE = "MySQL back-end 'docker'"

DEFAULT_IMAGE = "localhost/cqd_mpi-mysql:latest"
"""The tag env/mariadb-image.sh (and `podman build -f env/Dockerfile.mysql`) gives the image."""

RESULT_CHARS = 800
"""AgentBench's cut of a statement's printed result; longer ones end with TRUNCATED_MARK."""

TRUNCATED_MARK = "[TRUNCATED]"

ITEM_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, "
    "CREATE TEMPORARY TABLES, CREATE VIEW, SHOW VIEW"
)
"""What an item's user may do, on its own database only."""

CONNECTION_ERRNOS = frozenset({1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031})
"""Client/server error numbers that mean the server is unreachable or the connection died."""

DOCKER_SERVER_ARGS = ("--innodb-flush-log-at-trx-commit=0", "--max-connections=1000")
"""Server options for the throwaway container (AgentBench passes the same flush setting);
both the official mysql image and env/mariadb-image.sh's pass them on to the server."""

HASH_GROUP_CONCAT_MAX_LEN = 1024
"""MySQL's default group_concat_max_len, under which AgentBench's answer_md5 values were made."""


@dataclasses.dataclass
class ServerSettings:
    """`settings.server` of a dbbench task: which MySQL-compatible server items run on.

    `dsn` (mysql://user:password@host:port) replaces host/port/user/password for `external`.
    `binary` is the mariadbd/mysqld of `local` (default: found on PATH or in /usr/sbin).
    `image` and `docker_host` (default: $DOCKER_HOST, then the docker SDK's default) serve
    `docker`. A server that does not answer is retried `connect_attempts` times, waiting
    connect_backoff_s, then twice as long each time (at most 8 s).
    """

    backend: Literal["external", "local", "docker"] = "external"
    dsn: str | None = None
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    binary: str | None = None
    image: str = DEFAULT_IMAGE
    docker_host: str | None = None
    connect_attempts: int = 6
    connect_backoff_s: float = 0.5
    startup_timeout_s: float = 120.0

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: expected a TCP port 1-65535, got {self.port}")
        if self.connect_attempts < 1:
            raise ConfigError(f"{where}.connect_attempts: expected at least 1, got {self.connect_attempts}")
        for name in ("connect_backoff_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}: expected a number > 0, got {getattr(self, name)!r}")
        if self.dsn is not None:
            parse_dsn(self.dsn, where=f"{where}.dsn")


@dataclasses.dataclass(frozen=True)
class Address:
    """Where a server listens and who administers it."""

    host: str
    port: int
    user: str
    password: str = ""
    unix_socket: str | None = None

    def __str__(self) -> str:
        where = f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"
        return f"{self.user}@{where}"


def parse_dsn(dsn: str, *, where: str = "dsn") -> Address:
    """`mysql://user:password@host:port` (or mariadb://) as an Address; port 3306 by default."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
        raise ConfigError(f"{where}: expected 'mysql://user:password@host:port', got {dsn!r}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"{where}: the port in {dsn!r} is not a number 1-65535") from None
    return Address(
        host=parts.hostname,
        port=port,
        user=urllib.parse.unquote(parts.username or "root"),
        password=urllib.parse.unquote(parts.password or ""),
    )


def _is_loopback(address: Address) -> bool:
    """Whether the server is on this machine, where TLS buys nothing (and pymysql's per-connection
    TLS context costs ~60 ms)."""
    return address.unix_socket is not None or address.host in ("127.0.0.1", "localhost", "::1")


def quote_identifier(name: str) -> str:
    """A backtick-quoted MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def _quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _grant_pattern(database: str) -> str:
    """The database name as a GRANT pattern, with its `_` and `%` wildcards escaped."""
    return quote_identifier(re.sub(r"([_%\\])", r"\\\1", database))


def pymysql_module():
    """pymysql, imported on first use."""
    return require("pymysql", extra="llm", feature="The dbbench task's MySQL client")


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the server is gone or unreachable, rather than a statement error."""
    pymysql = pymysql_module()
    if isinstance(exc, (OSError, pymysql.err.InterfaceError)):
        return True
    if isinstance(exc, pymysql.err.OperationalError) and exc.args:
        return exc.args[0] in CONNECTION_ERRNOS
    return False


def format_error(exc: BaseException, sqlstate: str | None = None) -> str:
    """A server error as AgentBench's client prints it: '1064 (42000): You have an error ...'."""
    sqlstate = sqlstate or getattr(exc, "sqlstate", None)
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        errno, message = args[0], args[1]
        return f"{errno} ({sqlstate}): {message}" if sqlstate else f"{errno}: {message}"
    return str(exc)


def truncate(text: str, limit: int = RESULT_CHARS) -> str:
    """AgentBench's cut: the first `limit` characters, then TRUNCATED_MARK."""
    return text[:limit] + TRUNCATED_MARK if len(text) > limit else text


def read_result(cursor, limit: int = RESULT_CHARS, shown: Callable[[str], str] = str) -> tuple[str, bool]:
    """`str(cursor.fetchall())` cut as AgentBench cuts it, reading no more rows than needed.

    Returns the text and whether the result was read to its end. A statement without a result
    set prints as '[]', as AgentBench's client returns no rows for it. `shown` rewrites each
    printed row before it is counted (ItemDatabase shows its alias in place of its name).
    """
    if cursor.description is None:
        return "[]", True
    parts: list[str] = []
    length = 1
    while True:
        rows = cursor.fetchmany(64)
        if not rows:
            break
        for row in rows:
            text = shown(repr(tuple(row)))
            length += len(text) + (2 if parts else 0)
            parts.append(text)
            if length > limit + 1:
                return ("[" + ", ".join(parts))[:limit] + TRUNCATED_MARK, False
    return truncate("[" + ", ".join(parts) + "]", limit), True


@dataclasses.dataclass(frozen=True)
class Table:
    """A table to create for an item: every column TEXT, as AgentBench creates them."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclasses.dataclass(frozen=True)
class StatementLimits:
    """Per-statement bounds of an item's SQL."""

    statement_seconds: float = 10.0
    result_chars: int = RESULT_CHARS
    watchdog_grace_seconds: float = 1.0


class MySQLServer:
    """A reachable MySQL-compatible server: pooled admin connections, retries, kill, close."""

    backend = "external"

    def __init__(self, *, address: Address, attempts: int = 6, backoff_s: float = 0.5):
        self.address = address
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._pool: list[Any] = []
        self._pool_lock = threading.Lock()
        self._flavor: str | None = None
        self._version: str | None = None
        self._closed = False

    def describe(self) -> str:
        return f"MySQL back-end {self.backend!r} at {self.address}"

    # ------------------------------------------------------------- connections

    def connect(self, *, user: str | None = None, password: str | None = None, attempts: int | None = None,
                autocommit: bool = True, read_timeout: float | None = None, init_command: str | None = None):
        """A new connection (admin unless `user` is given), retried with backoff while the server is unreachable."""
        pymysql = pymysql_module()
        attempts = self.attempts if attempts is None else attempts
        address = self.address
        delay = self.backoff_s
        last: BaseException | None = None
        started = time.monotonic()
        for attempt in range(attempts):
            try:
                return pymysql.connect(
                    host=address.host, port=address.port, unix_socket=address.unix_socket,
                    user=address.user if user is None else user,
                    password=address.password if password is None else password,
                    charset="utf8mb4", autocommit=autocommit, connect_timeout=10,
                    read_timeout=read_timeout, write_timeout=read_timeout,
                    init_command=init_command, local_infile=False, ssl_disabled=_is_loopback(address),
                )
            except pymysql.MySQLError as exc:
                if not is_connection_error(exc):
                    if user is None and exc.args and exc.args[0] in (1044, 1045, 1698):
                        raise BackendUnavailable(
                            f"{self.describe()}: the server refuses the admin login ({format_error(exc)}); "
                            "check the user and password (or the DSN) in the task's settings.server"
                        ) from exc
                    raise
                last = exc
            if attempt + 1 < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise BackendUnavailable(
            f"{self.describe()} is unreachable after {attempts} attempt{'s' if attempts > 1 else ''} "
            f"over {time.monotonic() - started:.1f} s: {format_error(last) if last else 'no answer'}"
        )

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        """A pooled admin connection (autocommit); discarded instead of pooled if anything fails."""
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self.connect()
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        with self._pool_lock:
            if self._closed:
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                self._pool.append(conn)

    def run_admin(self, statements: Sequence[str | tuple[str, Sequence[Any]]]) -> list[tuple]:
        """Run admin statements in order, returning the last one's rows; a lost connection is
        replaced and the batch tried once more before BackendUnavailable."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.admin() as conn, conn.cursor() as cursor:
                    rows: list[tuple] = []
                    for statement in statements:
                        sql, params = (statement, None) if isinstance(statement, str) else statement
                        cursor.execute(sql, params)
                        rows = list(cursor.fetchall())
                    return rows
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                if attempt == 2:
                    raise BackendUnavailable(
                        f"{self.describe()}: the admin connection keeps failing ({format_error(exc)})"
                    ) from exc

    def ping(self) -> None:
        """Raise BackendUnavailable (after the retries) unless the server answers."""
        self.run_admin(["SELECT 1"])

    def kill(self, thread_id: int) -> None:
        """Kill one connection; an id that is already gone is fine."""
        try:
            self.run_admin([f"KILL CONNECTION {int(thread_id)}"])
        except Exception as exc:
            if not (getattr(exc, "args", None) and exc.args[0] == 1094):
                log.warning("%s: could not kill connection %s: %s", self.describe(), thread_id, exc)

    def _identify(self) -> None:
        version = str(self.run_admin(["SELECT VERSION()"])[0][0])
        self._version = version
        self._flavor = "mariadb" if "mariadb" in version.lower() else "mysql"

    @property
    def flavor(self) -> str:
        """'mariadb' or 'mysql', from the server's version string."""
        if self._flavor is None:
            self._identify()
        return self._flavor

    @property
    def version(self) -> str:
        if self._version is None:
            self._identify()
        return self._version

    def time_limit_sql(self, seconds: float) -> str:
        """The session statement that bounds each statement's run time on this server."""
        if self.flavor == "mariadb":
            return f"SET SESSION max_statement_time = {seconds:.3f}"
        return f"SET SESSION max_execution_time = {max(1, round(seconds * 1000))}"

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for conn in pool:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ExternalServer(MySQLServer):
    """A server somebody else runs; only our own databases and users are touched."""

    backend = "external"


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


class DockerServer(MySQLServer):
    """A container of a MySQL-compatible image, started through the docker SDK and removed on close."""

    backend = "docker"

    def __init__(self, *, image: str = DEFAULT_IMAGE, docker_host: str | None = None, attempts: int = 6,
                 backoff_s: float = 0.5, startup_timeout_s: float = 120.0):
        self.image = image
        self.client = containers.docker_client(docker_host, feature=FEATURE)
        self.base_url = self.client.cqd_base_url
        containers.ensure_image(self.client, image, feature=FEATURE, build_hint=(
            f"Build it with env/mariadb-image.sh (no registry needed) or, where `mysql` can be pulled, "
            f"podman build -t {image} -f env/Dockerfile.mysql env/"))
        containers.reap_orphans(self.client, "dbbench")
        password = secrets.token_hex(12)
        self.container = None
        super().__init__(address=Address(host=self._published_host(), port=0, user="root", password=password),
                         attempts=attempts, backoff_s=backoff_s)
        try:
            self.container = self.client.containers.run(
                image, command=list(DOCKER_SERVER_ARGS), detach=True, environment={"MYSQL_ROOT_PASSWORD": password},
                ports={"3306/tcp": (self._bind_ip(), None)}, labels=containers.labels("dbbench"),
                name=f"cqd_mpi-mysql-{os.getpid()}-{secrets.token_hex(3)}",
            )
            self.container.reload()
            port = int(self.container.ports["3306/tcp"][0]["HostPort"])
            self.address = dataclasses.replace(self.address, port=port)
            self._wait_ready(startup_timeout_s)
        except BackendUnavailable:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise BackendUnavailable(f"{self.describe()}: cannot start a container of {image!r}: {exc}") from exc

    def describe(self) -> str:
        return f"MySQL back-end 'docker' (image {self.image!r}) at {self.address}"

    def _published_host(self) -> str:
        url = self.base_url or ""
        if url.startswith(("tcp://", "http://", "https://")):
            return urllib.parse.urlsplit(url.replace("tcp://", "http://", 1)).hostname or "127.0.0.1"
        return "127.0.0.1"

    def _bind_ip(self) -> str:
        return "127.0.0.1" if self._published_host() in ("127.0.0.1", "localhost") else "0.0.0.0"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status in ("exited", "dead"):
                logs = self.container.logs(tail=30).decode(errors="replace")
                raise BackendUnavailable(f"{self.describe()}: the container exited during startup: {logs}")
            try:
                self.connect(attempts=1).close()
                return
            except BackendUnavailable:
                time.sleep(0.25)
        logs = self.container.logs(tail=30).decode(errors="replace")
        raise BackendUnavailable(f"{self.describe()}: no connection within {timeout_s:.0f} s; container log: {logs}")

    def close(self) -> None:
        super().close()
        container, self.container = getattr(self, "container", None), None
        if container is not None:
            containers.remove(container)


def open_server(settings: ServerSettings, *, temp_dir: str | None = None) -> MySQLServer:
    """Start or reach the server the settings name; the caller closes it."""
    retry = {"attempts": settings.connect_attempts, "backoff_s": settings.connect_backoff_s}
    if settings.backend == "external":
        address = (parse_dsn(settings.dsn) if settings.dsn else
                   Address(host=settings.host, port=settings.port, user=settings.user, password=settings.password))
        server = ExternalServer(address=address, **retry)
        server.ping()
        return server
    if settings.backend == "local":
        return LocalServer(binary=settings.binary, startup_timeout_s=settings.startup_timeout_s,
                           temp_dir=temp_dir, **retry)
    return DockerServer(image=settings.image, docker_host=settings.docker_host,
                        startup_timeout_s=settings.startup_timeout_s, **retry)


def unique_name(*, rank: int, item: str) -> str:
    """A database/user name unique per rank and item, with a random suffix (at most 32 characters)."""
    tag = re.sub(r"[^0-9A-Za-z]", "", str(item))[-8:] or "x"
    return f"cqd_r{int(rank)}_i{tag}_{secrets.token_hex(4)}"


class _Watchdog:
    """Kills a connection whose statement outlives its limit (a statement can lift its own session limit)."""

    def __init__(self, server: MySQLServer, thread_id: int, seconds: float):
        self.fired = False
        self._server = server
        self._thread_id = thread_id
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._server.kill(self._thread_id)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


class ItemDatabase:
    """One item's database and user on a shared server; see the module docstring for the bounds.

    The unique name never reaches the caller: results and errors show `alias` in its place
    (for the DB task, the table's name, which AgentBench names its database after), so what
    a model reads does not depend on the rank or on random bits.
    """

    def __init__(self, server: MySQLServer, *, name: str, alias: str | None = None,
                 limits: StatementLimits = StatementLimits()):
        self.server = server
        self.name = name
        self.alias = name if alias is None else alias
        self.limits = limits
        self._password = secrets.token_hex(16)
        self.created = False

    @classmethod
    def create(cls, server: MySQLServer, *, name: str, alias: str | None = None,
               limits: StatementLimits = StatementLimits()) -> ItemDatabase:
        """Create the (empty) database and its user, whose grants cover that database only."""
        item = cls(server, name=name, alias=alias, limits=limits)
        server.run_admin([f"CREATE DATABASE {quote_identifier(name)} CHARACTER SET utf8mb4"])
        item.created = True
        account = f"{_quote_string(name)}@'%'"
        try:
            server.run_admin([
                f"CREATE USER {account} IDENTIFIED BY {_quote_string(item._password)} WITH MAX_USER_CONNECTIONS 4",
                f"GRANT {ITEM_PRIVILEGES} ON {_grant_pattern(name)}.* TO {account}",
            ])
        except BaseException:
            item.drop()
            raise
        return item

    def load(self, table: Table) -> None:
        """Create a table and insert its rows as AgentBench does (every column TEXT, one INSERT).

        Raises pymysql's error when the server refuses the table (e.g. an empty column name);
        AgentBench then goes on with the database as it is, and so do callers.
        """
        target = f"{quote_identifier(self.name)}.{quote_identifier(table.name)}"
        columns = ",".join(f"{quote_identifier(c)} TEXT" for c in table.columns)
        statements: list[str | tuple[str, Sequence[Any]]] = [f"CREATE TABLE {target} ({columns})"]
        if table.rows:
            names = ",".join(quote_identifier(c) for c in table.columns)
            row = "(" + ",".join(["%s"] * len(table.columns)) + ")"
            values = [value for r in table.rows for value in r]
            insert = f"INSERT INTO {target} ({names}) VALUES ".replace("%", "%%")
            statements.append((insert + ",".join([row] * len(table.rows)), values))
        self.server.run_admin(statements)

    def _connect(self):
        timeout = self.limits.statement_seconds
        return self.server.connect(
            user=self.name, password=self._password, autocommit=False,
            read_timeout=2 * timeout + 30, init_command=self.server.time_limit_sql(timeout),
        )

    def execute(self, sql: str, *, session: Sequence[str] = ()) -> str:
        """Run one statement as the item's user; its result or error as AgentBench prints it.

        Raises BackendUnavailable only when the server itself is gone.
        """
        pymysql = pymysql_module()
        conn = self._connect()
        cursor = conn.cursor(pymysql.cursors.SSCursor)
        finished = False
        watchdog = _Watchdog(self.server, conn.thread_id(), self.limits.statement_seconds + self.limits.watchdog_grace_seconds)
        try:
            with watchdog:
                cursor.execute(f"USE {quote_identifier(self.name)}")
                for statement in session:
                    cursor.execute(statement)
                cursor.execute(sql)
                text, finished = read_result(cursor, self.limits.result_chars, self.shown)
                if finished:
                    conn.commit()
            return text
        except pymysql.MySQLError as exc:
            if watchdog.fired:
                return truncate(
                    f"Query execution was interrupted: the statement ran past the time limit of "
                    f"{self.limits.statement_seconds:g} s and its connection was killed", self.limits.result_chars)
            if is_connection_error(exc):
                self.server.ping()
                return truncate(self.shown(format_error(exc)), self.limits.result_chars)
            finished = True
            _abandon(cursor)
            sqlstate = getattr(exc, "sqlstate", None) or _sqlstate(conn)
            return truncate(self.shown(format_error(exc, sqlstate)), self.limits.result_chars)
        finally:
            if not finished and not watchdog.fired:
                self.server.kill(conn.thread_id())
            _abandon(cursor)
            with contextlib.suppress(Exception):
                conn.close()

    def shown(self, text: str) -> str:
        """`text` as the caller may see it: the alias in place of the database's unique name."""
        return text.replace(self.name, self.alias) if self.alias != self.name else text

    def table_hash(self, table: Table) -> str:
        """AgentBench's row-hash MD5 of a table, printed as its client prints the result: "[('…',)]"."""
        columns = ",".join(quote_identifier(c) for c in table.columns)
        query = (
            "select md5(group_concat(rowhash order by rowhash)) as hash "
            f"from( SELECT substring(MD5(CONCAT_WS(',', {columns})), 1, 5) AS rowhash "
            f"FROM {quote_identifier(table.name)}) as sub;"
        )
        return self.execute(query, session=[f"SET SESSION group_concat_max_len = {HASH_GROUP_CONCAT_MAX_LEN}"])

    def drop(self) -> None:
        """Drop the database and the user; safe to call twice."""
        if not self.created:
            return
        self.server.run_admin([
            f"DROP DATABASE IF EXISTS {quote_identifier(self.name)}",
            f"DROP USER IF EXISTS {_quote_string(self.name)}@'%'",
        ])
        self.created = False


def _abandon(cursor) -> None:
    """Forget an unbuffered result that was cut short, so that pymysql does not try to read the
    rest of it from the closed connection when the objects are garbage-collected."""
    result = getattr(cursor, "_result", None)
    if result is not None:
        result.unbuffered_active = False


def _sqlstate(conn) -> str | None:
    """The SQLSTATE of the connection's last error, for pymysql < 1.2 whose errors lack it."""
    try:
        with conn.cursor() as cursor:
            cursor.execute("GET DIAGNOSTICS CONDITION 1 @cqd_sqlstate = RETURNED_SQLSTATE")
            cursor.execute("SELECT @cqd_sqlstate")
            row = cursor.fetchone()
        return str(row[0]) if row and row[0] else None
    except Exception:
        return None
