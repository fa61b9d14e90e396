"""One item's sandbox on a shared server: its own database and user (`ItemDatabase`), bounded
statements, and AgentBench's table hash; see the package docstring for the bounds."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from cqd_mpi.sandboxes.mysql.client import (
    format_error,
    is_connection_error,
    pymysql_module,
)
from cqd_mpi.sandboxes.mysql.results import RESULT_CHARS, read_result, truncate
from cqd_mpi.sandboxes.mysql.server import MySQLServer

ITEM_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, "
    "CREATE TEMPORARY TABLES, CREATE VIEW, SHOW VIEW"
)
"""What an item's user may do, on its own database only."""


HASH_GROUP_CONCAT_MAX_LEN = 1024
"""MySQL's default group_concat_max_len, under which AgentBench's answer_md5 values were made."""


def quote_identifier(name: str) -> str:
    """A backtick-quoted MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def _quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _grant_pattern(database: str) -> str:
    """The database name as a GRANT pattern, with its `_` and `%` wildcards escaped."""
    return quote_identifier(re.sub(r"([_%\\])", r"\\\1", database))


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
