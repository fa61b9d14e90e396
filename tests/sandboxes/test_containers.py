"""Labelled containers: reaped when their owner died, tied ones gone with their owner (podman's socket)."""

import signal
import subprocess
import sys
import time

import pytest

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes import containers
from tests.conftest import subprocess_env
from tests.sandboxes.osenv_helpers import DOCKER_HOST, DOCKER_IMAGE

pytestmark = pytest.mark.docker

OWNER = """
import sys, os, signal
from cqd_mpi.sandboxes import containers
client = containers.docker_client(sys.argv[1], feature="test")
loose = client.containers.run(sys.argv[2], command=["sleep", "1000"], detach=True, labels=containers.labels("test-reap"))
tied, _ = containers.start_tied(client, sys.argv[2], purpose="test-reap", command=["bash"], host_config={})
print(loose.id, tied.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def ids(client):
    """The ids of the test's containers. sparse: no inspect per container, which fails with 500 "no
    such container" for one removed between the list and its inspect (the tied one, while it ends)."""
    return {c.id for c in client.containers.list(all=True, sparse=True, filters={"label": "cqd_mpi=test-reap"})}


def test_a_dead_owners_containers_are_reaped_and_tied_ones_end_with_it():
    client = containers.docker_client(DOCKER_HOST, feature="test")
    ours = client.containers.run(DOCKER_IMAGE, command=["sleep", "1000"], detach=True,
                                 labels=containers.labels("test-reap"))
    try:
        owner = subprocess.run([sys.executable, "-c", OWNER, DOCKER_HOST, DOCKER_IMAGE], capture_output=True,
                               text=True, env=subprocess_env(), timeout=120)
        assert owner.returncode == -signal.SIGKILL, owner.stderr[-2000:]
        loose, tied = owner.stdout.split()
        deadline = time.monotonic() + 60
        while tied in ids(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tied not in ids(client)
        assert loose in ids(client)
        assert containers.reap_orphans(client, "test-reap") == 1
        assert ids(client) == {ours.id}
    finally:
        containers.remove(ours)
        containers.reap_orphans(client, "test-reap")  # a failed try leaves no orphan to the next run
    assert containers.owner().split(":")[1].isdigit()


def test_a_missing_engine_and_a_missing_image_are_named():
    with pytest.raises(BackendUnavailable, match=r"test: no container engine answers at unix:///nonexistent.sock"):
        containers.docker_client("unix:///nonexistent.sock", feature="test")
    client = containers.docker_client(DOCKER_HOST, feature="test")
    with pytest.raises(BackendUnavailable, match=r"image 'localhost/cqd-no-such-image:1' is not present .* build it so"):
        containers.ensure_image(client, "localhost/cqd-no-such-image:1", feature="test", build_hint="build it so")
