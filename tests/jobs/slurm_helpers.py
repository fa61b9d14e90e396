"""Talking to a real SLURM cluster (env/slurm-cluster.sh or env/slurm-multinode.sh) from tests:
is one up, submit with the environment a job needs, follow a job to its end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (no sbatch)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        first = (ping.stdout + ping.stderr).strip().splitlines()[:1]
        return f"slurmctld does not answer (scontrol ping: {' '.join(first) or ping.returncode})"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no SLURM node is up (sinfo: {states})"
    return None


def require_cluster(why: str | None, how: str, required_by: str = "CQD_REQUIRE_SLURM") -> None:
    """Skip (saying why and `how` to start one), or fail where the variable `required_by` is 1
    (.ci/run sets CQD_REQUIRE_SLURM for the one-node cluster)."""
    if why:
        if os.environ.get(required_by) == "1":
            pytest.fail(f"{required_by}=1, but {why}", pytrace=False)
        pytest.skip(f"{why}; {how}")


def job_env(**extra) -> dict:
    """What sbatch passes on: no env/cluster.sh, srun --mpi=pmi2 for the mpich wheel."""
    return subprocess_env(**{"CQD_ENV": "/nonexistent", "CQD_SRUN_MPI": os.environ.get("CQD_SRUN_MPI", "pmi2"),
                             **extra})


def job_info(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_job(job_id: str, out: Path, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    log = out.read_text()[-3000:] if out.exists() else "(no output yet)"
    raise TimeoutError(f"job {job_id} not finished after {timeout} s: {job_info(job_id)}\n{log}")


def phases(log: str) -> list[str]:
    """The run phase the script found after each start."""
    return re.findall(r"run phase: (\w+)", log)
