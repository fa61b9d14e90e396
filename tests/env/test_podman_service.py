"""env/podman-service.sh: the Docker-compatible socket that the docker MySQL back-end uses."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.docker
SCRIPT = REPO / "env" / "podman-service.sh"


def service_pids(socket: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"podman system service --time=0 unix://{socket}"],
                           capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def start_script(socket: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CQD_PODMAN_SOCKET=str(socket))
    return subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60,
                          cwd=REPO)


def ping(socket: Path) -> bool:
    """The Docker API's _ping answered on this socket, as the script itself checks it."""
    answer = subprocess.run(["curl", "-fsS", "--max-time", "2", "--unix-socket", str(socket), "http://d/_ping"],
                            capture_output=True, text=True)
    return answer.returncode == 0 and answer.stdout == "OK"


@pytest.fixture
def service_socket(tmp_path):
    path = tmp_path / "p.sock"
    yield path
    for pid in service_pids(path):
        os.kill(pid, 15)


def test_a_running_service_is_reused_and_one_left_in_a_deleted_directory_is_replaced(service_socket, tmp_path):
    socket = service_socket
    gone = tmp_path / "checkout"
    gone.mkdir()
    stale = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], cwd=gone,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not ping(socket):
        assert time.monotonic() < deadline, "podman system service did not answer within 20 s"
        time.sleep(0.2)
    first = start_script(socket)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"unix://{socket}" and service_pids(socket) == [stale.pid]

    shutil.rmtree(gone)
    second = start_script(socket)
    assert second.returncode == 0, second.stderr
    assert f"restarting the service (pid {stale.pid}): its working directory was deleted" in second.stderr
    assert stale.wait(timeout=10) is not None
    (fresh,) = service_pids(socket)
    assert fresh != stale.pid and os.readlink(f"/proc/{fresh}/cwd") == "/"
    assert second.stdout.strip() == f"unix://{socket}" and ping(socket)
