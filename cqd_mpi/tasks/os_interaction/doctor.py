"""Whether the configured OS back-end can start the items' environments (`doctor`), without
starting one."""

from __future__ import annotations

from collections.abc import Sequence

from cqd_mpi.errors import BackendUnavailable, TaskError
from cqd_mpi.tasks.base import BackendStatus
from cqd_mpi.tasks.os_interaction.settings import EnvironmentSettings


def environment_status(settings: EnvironmentSettings, images: Sequence[str], resolve) -> list[BackendStatus]:
    """Whether the configured back-end can start the images' environments, without starting one. Never raises."""
    name = f"os environment ({settings.backend})"
    out = []
    try:
        if settings.backend == "bwrap":
            from cqd_mpi.sandboxes.osenv_bwrap import bwrap_usable

            out.append(BackendStatus(name, *bwrap_usable()))
            for image in images:
                source = resolve(settings.image_for(image))
                present = source.exists()
                out.append(BackendStatus(f"os image {image} (bwrap)", present,
                                         f"{source}" if present else f"{source} is missing: build it with env/os-image.sh"))
            return out
        from cqd_mpi.sandboxes import containers
        from cqd_mpi.sandboxes.osenv_docker import FEATURE

        client = containers.docker_client(settings.docker_host, feature=FEATURE)
        try:
            out.append(BackendStatus(name, True, f"engine at {client.cqd_base_url or 'the default docker socket'}"))
            for image in images:
                tag = settings.image_for(image)
                try:
                    client.images.get(tag)
                    out.append(BackendStatus(f"os image {image} (docker)", True, tag))
                except Exception as exc:
                    out.append(BackendStatus(f"os image {image} (docker)", False,
                                             f"{tag}: {exc}; build it with env/os-image.sh"))
        finally:
            client.close()
    except (BackendUnavailable, TaskError) as exc:
        out.append(BackendStatus(name, False, str(exc)))
    except Exception as exc:
        out.append(BackendStatus(name, False, f"{type(exc).__name__}: {exc}"))
    return out
