"""A run killed at any point (kill -9), stopped by a signal or ended by an evaluation's deadline
resumes to the same final state."""

import re
import signal
import subprocess
import sys

import pytest

from cqd_mpi.run.state import read_state
from cqd_mpi.runtime.deadline import EXIT_STATUS
from tests.conftest import small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli, wait_for_generation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    config = write_config(root / "config.yaml", small_config(tiny_family, root / "run"))
    result = run_cli("run", config)
    assert result.returncode == 0, result.stderr
    return root / "run"


def config_for(tiny_family, tmp_path):
    return write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run"))


@pytest.mark.parametrize(("fault", "lost_point"), [
    ("merge:kill:7", "during the merge of generation 3"),
    ("eval:kill:6", "during the evaluation of generation 2"),
    ("checkpoint:kill:8", "while writing the checkpoint after generation 3"),
])
def test_kill_9_then_resume_equals_uninterrupted_run(baseline, tiny_family, tmp_path, fault, lost_point):
    config = config_for(tiny_family, tmp_path)
    killed = run_cli("run", config, env=subprocess_env(CQD_MPI_FAULT=fault))
    assert killed.returncode == -signal.SIGKILL, (lost_point, killed.stderr[-2000:])
    state = read_state(tmp_path / "run" / "state.h5")
    assert state["attrs"]["phase"] != "done"
    resumed = run_cli("run", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(baseline, tmp_path / "run")


def test_corrupt_checkpoint_after_a_crash_falls_back_to_backup(baseline, tiny_family, tmp_path):
    config = config_for(tiny_family, tmp_path)
    assert run_cli("run", config, env=subprocess_env(CQD_MPI_FAULT="eval:kill:8")).returncode == -signal.SIGKILL
    state = tmp_path / "run" / "state.h5"
    state.write_bytes(state.read_bytes()[:1000])
    resumed = run_cli("run", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "falling back to the previous checkpoint" in resumed.stderr
    assert_same_results(baseline, tmp_path / "run")


def test_sigterm_stops_at_a_generation_boundary_and_resumes(baseline, tiny_family, tmp_path):
    config = config_for(tiny_family, tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "cqd_mpi", "run", str(config)], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "run" / "state.h5"
    wait_for_generation(tmp_path / "run", 2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "received SIGTERM" in err and "stopping" in err
    stopped_at = read_state(state)["attrs"]
    assert stopped_at["phase"] != "done"
    resumed = run_cli("run", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(baseline, tmp_path / "run")


def test_an_evaluation_past_its_deadline_ends_the_run_naming_it_and_resumes(baseline, tiny_family, tmp_path):
    """One process: the task blocks for ever at a chunk; past runtime.eval_deadline the process
    exits with the message, and the rerun resumes."""
    config = write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run",
                                                                 **{"runtime.eval_deadline": 4}))
    hung = run_cli("run", config, env=subprocess_env(CQD_MPI_FAULT="chunk:hang:30"), timeout=60)
    assert hung.returncode == EXIT_STATUS, hung.stderr[-3000:]
    assert re.search(r"\[rank 0\] cqd_mpi: error: chunk \d+ of task '\w+' .* ran past its deadline of 4 s", hung.stderr)
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] == "search"
    resumed = run_cli("run", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(baseline, tmp_path / "run")
