"""Containers through the docker SDK, for the DB task's MySQL server and the OS task's items.

One place for what both need: a client for `docker_host` (else $DOCKER_HOST, else the SDK's
default socket; podman's Docker-compatible socket works, env/podman-service.sh), an image
that is present or pulled (with the script that builds it when no registry answers), and
containers labelled with their purpose and their owner (host, pid and start time of the
worker that made them). `reap_orphans` removes containers of a purpose whose owner on this
host is gone (a worker killed with SIGKILL cannot remove its own); `start_tied` starts a
container whose first process reads its stdin from this process, so that it ends, and is
removed, when this process dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from cqd_mpi.errors import BackendUnavailable, require

log = logging.getLogger("cqd_mpi.sandboxes.containers")

PURPOSE_LABEL = "cqd_mpi"
OWNER_LABEL = "cqd_mpi.owner"


def docker_module(feature: str):
    return require("docker", extra="docker", feature=feature)


def docker_client(docker_host: str | None, *, feature: str):
    """A client that answers, or BackendUnavailable naming the socket and how to start one."""
    docker = docker_module(feature)
    base_url = docker_host or os.environ.get("DOCKER_HOST") or None
    where = base_url or "the docker SDK's default socket (DOCKER_HOST is unset)"
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except Exception as exc:
        raise BackendUnavailable(
            f"{feature}: no container engine answers at {where} ({exc}). Start one, e.g. "
            "podman's Docker-compatible socket: export DOCKER_HOST=\"$(env/podman-service.sh)\""
        ) from exc
    client.cqd_base_url = base_url
    return client


def ensure_image(client, image: str, *, feature: str, build_hint: str) -> None:
    """The image is present, or pulled; else BackendUnavailable with `build_hint`."""
    docker = docker_module(feature)
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    except Exception as exc:
        raise BackendUnavailable(f"{feature}: cannot query image {image!r}: {exc}") from exc
    try:
        client.images.pull(image)
    except Exception as exc:
        raise BackendUnavailable(
            f"{feature}: image {image!r} is not present and cannot be pulled ({exc}). {build_hint}"
        ) from exc


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> str:
    """This process as a label value: host:pid:start time (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def labels(purpose: str) -> dict[str, str]:
    return {PURPOSE_LABEL: purpose, OWNER_LABEL: owner()}


def _owner_gone(value: str) -> bool:
    host, _, rest = value.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _start_time(int(pid)) != started


def reap_orphans(client, purpose: str) -> int:
    """Remove the containers of `purpose` whose owner on this host has died; how many."""
    removed = 0
    try:
        found = client.containers.list(all=True, filters={"label": f"{PURPOSE_LABEL}={purpose}"})
    except Exception as exc:
        log.warning("cannot list %s containers to reap: %s", purpose, exc)
        return 0
    for container in found:
        value = (container.labels or {}).get(OWNER_LABEL, "")
        if value and _owner_gone(value):
            with contextlib.suppress(Exception):
                container.remove(force=True)
                removed += 1
    if removed:
        log.info("removed %d %s container(s) left by workers that died", removed, purpose)
    return removed


def start_tied(client, image: str, *, purpose: str, command: list[str], host_config: dict[str, Any],
               **create: Any) -> tuple[Any, Any]:
    """Create and start a container whose first process (`command`) reads its stdin, attached here:
    when this process dies the stream closes, stdin ends (StdinOnce), the first process exits and
    the container is removed (AutoRemove). Returns (container, the attached stdin socket)."""
    api = client.api
    config = api.create_host_config(auto_remove=True, **host_config)
    created = api.create_container(image, command=command, stdin_open=True, detach=False, tty=False,
                                   labels=labels(purpose), host_config=config, **create)
    container = client.containers.get(created["Id"])
    try:
        stdin = container.attach_socket(params={"stdin": 1, "stream": 1})
        container.start()
        container.reload()
    except BaseException:
        remove(container)
        raise
    return container, stdin


def remove(container) -> None:
    """Remove a container, running or not; one that is already gone is fine."""
    with contextlib.suppress(Exception):
        container.remove(force=True)
