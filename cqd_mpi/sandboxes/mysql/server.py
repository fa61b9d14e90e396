"""A reachable MySQL-compatible server (`MySQLServer`): pooled admin connections, retries with
backoff, kill, close; `ExternalServer` is one somebody else runs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes.mysql.client import (
    format_error,
    is_connection_error,
    pymysql_module,
)
from cqd_mpi.sandboxes.mysql.dsn import Address, _is_loopback

log = logging.getLogger("cqd_mpi.sandboxes.mysql")


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
