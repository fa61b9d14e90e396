"""Where a MySQL server listens: `Address` and the DSN that names one."""

from __future__ import annotations

import dataclasses
import urllib.parse

from cqd_mpi.errors import ConfigError


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
