"""Whether the configured MySQL back-end can be used (`doctor`), without starting anything."""

from __future__ import annotations

import contextlib

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes import containers
from cqd_mpi.sandboxes.mysql import (
    Address,
    ExternalServer,
    ServerSettings,
    find_server_binary,
    parse_dsn,
)
from cqd_mpi.tasks.base import BackendStatus


def server_status(settings: ServerSettings) -> BackendStatus:
    """Whether the configured MySQL back-end can be used, without starting anything. Never raises."""
    name = f"mysql ({settings.backend})"
    try:
        if settings.backend == "external":
            address = (parse_dsn(settings.dsn) if settings.dsn else
                       Address(host=settings.host, port=settings.port, user=settings.user, password=settings.password))
            with ExternalServer(address=address, attempts=1) as server:
                return BackendStatus(name, True, f"{server.version} at {address}")
        if settings.backend == "local":
            return BackendStatus(name, True, f"will start {find_server_binary(settings.binary)}")
        client = containers.docker_client(settings.docker_host, feature="The dbbench 'docker' MySQL back-end")
        with contextlib.closing(client):
            client.images.get(settings.image)
        return BackendStatus(name, True, f"image {settings.image} at {client.cqd_base_url or 'the default docker socket'}")
    except BackendUnavailable as exc:
        return BackendStatus(name, False, str(exc))
    except Exception as exc:
        return BackendStatus(name, False, f"{type(exc).__name__}: {exc}")
