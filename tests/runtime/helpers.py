"""Comparing run states the way the resume and rank-count invariants are stated."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cqd_mpi.run.state import read_state
from tests.conftest import subprocess_env
from tests.forkserver import run_cqd
from tests.qd.helpers import assert_trees_equal

TIMING_COLUMNS = ("merge_s", "transfer_s", "eval_s", "total_s")
RUN_ATTRS = ("world_size", "config", "config_hash", "package_version")


def comparable_state(run_dir: Path) -> dict:
    """state.h5 without timings and without attributes that describe the launch, not the result."""
    tree = read_state(Path(run_dir) / "state.h5")
    for key in TIMING_COLUMNS:
        tree["history"].pop(key)
    for key in RUN_ATTRS:
        tree["attrs"].pop(key, None)
    return tree


def assert_same_results(run_a: Path, run_b: Path) -> None:
    assert_trees_equal(comparable_state(run_a), comparable_state(run_b))
    models_a = sorted(p.name for p in (Path(run_a) / "models").iterdir())
    models_b = sorted(p.name for p in (Path(run_b) / "models").iterdir())
    assert models_a == models_b


def run_cli(*args, env=None, timeout=300, mpi_ranks: int | None = None) -> subprocess.CompletedProcess:
    """`python -m cqd_mpi ARGS`, under `mpiexec -n RANKS` when mpi_ranks is given; its processes
    forked from the worker's fork server (tests/forkserver.py), which has torch imported already."""
    return run_cqd(list(map(str, args)), env=env or subprocess_env(), mpi_ranks=mpi_ranks, timeout=timeout)


def run_command(command: list[str], *, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env or subprocess_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_generation(run_dir: Path, generation: int, *, timeout: float = 120, also=lambda: True) -> None:
    """Poll RUN_DIR/state.h5 until it records `generation` generations (and `also()` holds)."""
    state = Path(run_dir) / "state.h5"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if also() and state.exists() and read_state(state)["attrs"]["generations_done"] >= generation:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{state} did not reach generation {generation} within {timeout} s")
