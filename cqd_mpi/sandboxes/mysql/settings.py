"""`settings.server` of a dbbench task, and the server it names, started or reached."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cqd_mpi.errors import ConfigError
from cqd_mpi.sandboxes.mysql.docker_server import DEFAULT_IMAGE, DockerServer
from cqd_mpi.sandboxes.mysql.dsn import Address, parse_dsn
from cqd_mpi.sandboxes.mysql.local_server import LocalServer
from cqd_mpi.sandboxes.mysql.server import ExternalServer, MySQLServer


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
