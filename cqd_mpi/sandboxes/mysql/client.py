"""pymysql, imported on first use, and how its errors read: lost connections against
statement errors, and errors printed as AgentBench's client prints them."""

from __future__ import annotations

from cqd_mpi.errors import require

CONNECTION_ERRNOS = frozenset({1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031})
"""Client/server error numbers that mean the server is unreachable or the connection died."""


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
