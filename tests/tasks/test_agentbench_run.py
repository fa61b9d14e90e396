"""The paper's Table 1 tasks in one CycleQD run: mbpp, dbbench and os (bwrap), tiny models, CPU.

Under `mpiexec -n 3` it runs to the end, resumes after a worker is killed with SIGKILL while
its OS environments run (the `os-setup` fault point), leaves none of them behind, and gives
the same state as the uninterrupted run and as a run with one worker (`mpiexec -n 2`).
"""

import os
import time
from pathlib import Path

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli
from tests.sandboxes.osenv_helpers import ROOTFS, rootfs_dir
from tests.tasks.os_items import write_items

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DSN = os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306")

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def three_task_config(family, run_dir: Path, os_data: Path) -> dict:
    names = ("code", "db", "os")
    return {
        "base": str(family["base"]),
        "experts": [{"task": name, "path": str(path)} for name, path in zip(names, family["experts"].values())],
        "tasks": [
            {"name": "code", "kind": "mbpp", "data": str(FIXTURES / "mbpp" / "MbppPlus-fixture.jsonl"),
             "settings": {"task_ids": ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/6"], "max_new_tokens": 8},
             "batch_size": 2, "bins": {"lower": 0.0, "upper": 1.0, "n_bins": 3}},
            {"name": "db", "kind": "dbbench", "data": str(FIXTURES / "dbbench" / "dev.jsonl"),
             "settings": {"item_ids": ["0", "1", "20", "40"], "max_new_tokens": 8, "max_rounds": 2,
                          "server": {"dsn": DSN}},
             "batch_size": 2, "bins": {"lower": 0.0, "upper": 1.0, "n_bins": 3}},
            {"name": "os", "kind": "os", "data": str(os_data / "data" / "dev.json"),
             "settings": {"item_ids": ["dev-00000", "dev-00001", "dev-00003", "dev-00004"], "max_new_tokens": 8,
                          "max_rounds": 2, "environment": {"backend": "bwrap", "images": {"default": ROOTFS},
                                                           "command_seconds": 5, "memory": "256MiB"}},
             "batch_size": 2, "bins": {"lower": 0.0, "upper": 1.0, "n_bins": 3}},
        ],
        "qd": {"generations": 2, "n_bins": 3, "mutation": {"kind": "svd", "rank": 4, "w_max": 0.3}},
        "runtime": {"run_dir": str(run_dir), "seed": 5, "threads": 1},
        "engine": {"device": "cpu", "settings": {"batch_size": 8, "chat_template": "instruction-response"}},
    }


@pytest.fixture(scope="module")
def os_data(tmp_path_factory):
    rootfs_dir()
    return write_items(tmp_path_factory.mktemp("os-items"))


def environments_alive(scope: Path) -> list[int]:
    """Host pids of OS environments (their outer sandbox runs `sh -c ... cqd-outer`) started by
    this test's runs: they inherit the runs' CQD_TEST_SCOPE, so environments of other modules'
    tests, running at the same time, are not counted."""
    token = f"CQD_TEST_SCOPE={scope}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"cqd-outer" in (entry / "cmdline").read_bytes() and token in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def run(family, root: Path, os_data: Path, ranks: int, **env):
    root.mkdir(exist_ok=True)
    config = write_config(root / "config.yaml", three_task_config(family, root / "run", os_data))
    return run_cli("run", config, mpi_ranks=ranks, timeout=900,
                   env=subprocess_env(CQD_TEST_SCOPE=root.parent, **env))


def test_the_environment_scan_sees_its_own_scope_only(os_data, tmp_path, monkeypatch):
    """What makes the leftover check below able to fail: a live environment started under the
    scope is found, one of another scope is not, and none after it closes."""
    from tests.sandboxes.osenv_helpers import make_env

    monkeypatch.setenv("CQD_TEST_SCOPE", str(tmp_path))
    environment = make_env("bwrap")
    try:
        assert environments_alive(tmp_path) and environments_alive(tmp_path / "other") == []
    finally:
        environment.close()
    assert environments_alive(tmp_path) == []


def test_mbpp_dbbench_and_os_run_resume_and_agree_on_one_or_two_workers(tiny_family, os_data, tmp_path):
    two = run(tiny_family, tmp_path / "two", os_data, 3)
    assert two.returncode == 0, two.stderr[-4000:]
    state = read_state(tmp_path / "two" / "run" / "state.h5")
    assert state["attrs"]["phase"] == "done" and list(state["attrs"]["task_names"]) == ["code", "db", "os"]
    assert state["items"]["os"]["search"].shape[1] == 2 and state["items"]["db"]["test"].shape[1] == 2

    one = run(tiny_family, tmp_path / "one", os_data, 2)
    assert one.returncode == 0, one.stderr[-4000:]
    assert_same_results(tmp_path / "two" / "run", tmp_path / "one" / "run")

    killed = run(tiny_family, tmp_path / "killed", os_data, 3, CQD_MPI_FAULT="os-setup@1:kill:3")
    assert killed.returncode != 0
    assert read_state(tmp_path / "killed" / "run" / "state.h5")["attrs"]["phase"] != "done"
    deadline = time.monotonic() + 20
    while environments_alive(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert environments_alive(tmp_path) == []
    resumed = run(tiny_family, tmp_path / "killed", os_data, 3)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming" in resumed.stdout
    assert_same_results(tmp_path / "two" / "run", tmp_path / "killed" / "run")
