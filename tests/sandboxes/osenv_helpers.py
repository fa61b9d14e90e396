"""The OS environments the tests run on: env/os-image.sh's rootfs (bwrap) and image (docker).

CQD_TEST_OS_ROOTFS overrides the tarball or directory; the docker tests use DOCKER_HOST
(default podman's socket of env/podman-service.sh). A missing image fails the test with the
command that builds it; nothing is skipped.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import pytest

from cqd_mpi.sandboxes.osenv import EnvLimits

CACHE = os.environ.get("CQD_CACHE_DIR", "/var/cache/cqd_mpi")
ROOTFS = os.environ.get("CQD_TEST_OS_ROOTFS", f"{CACHE}/os-default-rootfs-bookworm.tar")
DOCKER_IMAGE = "localhost/cqd_mpi-os-default:latest"
DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///tmp/podman.sock")

SMALL = dict(command_seconds=3.0, script_seconds=10.0, memory_bytes=256 << 20, processes=64, disk_bytes=64 << 20,
             inodes=4096, output_bytes=256 << 10, interrupt_seconds=2.0)
"""Limits small enough that every hostile test ends in seconds."""

BACKENDS = ["bwrap", pytest.param("docker", marks=pytest.mark.docker)]

_rootfs: Path | None = None
_docker: dict = {}


def rootfs_dir(tmp_root: Path | None = None) -> Path:
    """The default image's rootfs, unpacked once per test session."""
    global _rootfs
    from cqd_mpi.sandboxes.osenv_bwrap import default_rootfs_cache, ensure_rootfs

    if _rootfs is None:
        if not Path(ROOTFS).exists():
            pytest.fail(f"the OS rootfs {ROOTFS} is missing: build it with env/os-image.sh "
                        "(or point CQD_TEST_OS_ROOTFS at one)")
        _rootfs = ensure_rootfs(ROOTFS, default_rootfs_cache())
    return _rootfs


def docker_parts():
    """(client, Pristine) for the default image, made once per session."""
    from cqd_mpi.sandboxes import containers
    from cqd_mpi.sandboxes.osenv_docker import FEATURE, Pristine

    if not _docker:
        client = containers.docker_client(DOCKER_HOST, feature=FEATURE)
        try:
            client.images.get(DOCKER_IMAGE)
        except Exception as exc:
            pytest.fail(f"the OS image {DOCKER_IMAGE} is missing ({exc}): build it with env/os-image.sh")
        _docker.update(client=client, pristine=Pristine(client, DOCKER_IMAGE))
        atexit.register(_docker["pristine"].close)
    return _docker["client"], _docker["pristine"]


def make_env(backend: str, **limits):
    """A fresh environment of the default image with SMALL limits (overridable)."""
    settings = EnvLimits(**{**SMALL, **limits})
    if backend == "bwrap":
        from cqd_mpi.sandboxes.osenv_bwrap import BwrapEnvironment

        return BwrapEnvironment(rootfs=rootfs_dir(), image="default", limits=settings)
    from cqd_mpi.sandboxes.osenv_docker import DockerEnvironment

    client, pristine = docker_parts()
    return DockerEnvironment(client=client, image="default", tag=DOCKER_IMAGE, limits=settings, pristine=pristine)


def processes_in(namespace: str) -> list[int]:
    """Host pids of the live (not zombie) processes in a pid namespace."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry.name}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found
