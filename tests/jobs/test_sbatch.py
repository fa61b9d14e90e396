"""The sbatch scripts' requeue logic, run by bash with stand-ins for SLURM's srun and scontrol.

srun becomes `mpiexec -n 2` (the real MPI runtime), scontrol records the requeue request.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import REPO, small_config, write_config
from tests.runtime.helpers import wait_for_generation

pytestmark = pytest.mark.mpi

def start(script, config, env):
    return subprocess.Popen(["bash", str(REPO / "jobs" / script), str(config)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_warning_signal_checkpoints_and_requeues_then_the_requeued_job_finishes(slurm, tiny_family, tmp_path):
    env, log = slurm
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))
    job = start("single-node.sbatch", config, env())
    state = tmp_path / "run" / "state.h5"
    wait_for_generation(tmp_path / "run", 1)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    assert "asking all ranks to checkpoint" in out
    assert log.read_text().split() == ["requeue", "4242"]
    assert read_state(state)["attrs"]["phase"] != "done"

    log.unlink()
    again = start("single-node.sbatch", config, env(SLURM_RESTART_COUNT="1"))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "run phase: done" in out and "start 2" in out
    assert not log.exists()
    assert read_state(state)["attrs"]["phase"] == "done"


def test_a_stop_signal_that_reaches_only_a_worker_still_checkpoints_and_requeues(slurm, tiny_family, tmp_path):
    """A signal can reach a worker and not rank 0 (a kill of one rank, or one that lands just
    after rank 0's part of the stop agreement); the agreement must then end the job, not
    deadlock it."""
    env, log = slurm
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))
    job = start("single-node.sbatch", config, env())
    worker_log = tmp_path / "run" / "logs" / "rank-1.log"
    deadline = time.time() + 60
    while not (worker_log.exists() and (pid := re.search(r"\(pid (\d+)\)", worker_log.read_text()))):
        assert time.time() < deadline and job.poll() is None, "the worker never started"
        time.sleep(0.05)
    os.kill(int(pid.group(1)), signal.SIGUSR1)
    try:
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:  # deadlocked: end the ranks too, not only bash
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    assert "stopping (a worker received a stop signal)" in (tmp_path / "run" / "logs" / "rank-0.log").read_text()
    assert log.read_text().split() == ["requeue", "4242"]


def test_a_signal_after_srun_exited_does_not_cut_the_requeue_short(slurm, tiny_family, tmp_path):
    env, log = slurm
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))
    gone = tmp_path / "srun-gone"
    job = start("single-node.sbatch", config, env(FAKE_SRUN_GONE=gone))
    deadline = time.time() + 30
    while not gone.exists():
        assert time.time() < deadline and job.poll() is None, "srun never ran"
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)  # while the script reads the run's phase (a python start-up)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err[-3000:]
    assert "run phase: none" in out and log.read_text().split() == ["requeue", "4242"]


def test_restart_cap_stops_requeueing(slurm, tiny_family, tmp_path):
    env, log = slurm
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))
    job = start("multi-node.sbatch", config, env(SLURM_RESTART_COUNT="3", CQD_MAX_RESTARTS="2"))
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1
    assert "restarted 3 times (CQD_MAX_RESTARTS=2)" in err
    assert not log.exists() and not Path(tmp_path / "run").exists()


def test_a_failing_run_is_not_requeued(slurm, tiny_family, tmp_path):
    env, log = slurm
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))
    job = start("single-node.sbatch", config, env(CQD_MPI_FAULT="eval@1:raise:2"))
    _, err = job.communicate(timeout=180)
    assert job.returncode != 0
    assert "the run failed" in err and "not requeueing" in err
    assert not log.exists()
