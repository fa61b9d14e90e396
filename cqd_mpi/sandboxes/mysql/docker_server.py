"""The `docker` back-end: a container of a MySQL-compatible image through the docker SDK, as
AgentBench runs its server; podman's Docker-compatible socket works (env/podman-service.sh)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import urllib.parse

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes import containers
from cqd_mpi.sandboxes.mysql.dsn import Address
from cqd_mpi.sandboxes.mysql.server import MySQLServer

FEATURE = "MySQL back-end 'docker'"

DEFAULT_IMAGE = "localhost/cqd_mpi-mysql:latest"
"""The tag env/mariadb-image.sh (and `podman build -f env/Dockerfile.mysql`) gives the image."""


DOCKER_SERVER_ARGS = ("--innodb-flush-log-at-trx-commit=0", "--max-connections=1000")
"""Server options for the throwaway container (AgentBench passes the same flush setting);
both the official mysql image and env/mariadb-image.sh's pass them on to the server."""


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
