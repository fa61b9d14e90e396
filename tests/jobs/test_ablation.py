"""jobs/ablation.sbatch: one array task per trial and seed, then the table, with srun as
`mpiexec -n 2` (tests/jobs/conftest.py's stand-ins for SLURM)."""

import subprocess

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import REPO, small_config, write_config

pytestmark = [pytest.mark.mpi, pytest.mark.extra("baselines")]  # the trials run are cma-es and nsga2


def submit(config, out, env):
    return subprocess.run(["bash", str(REPO / "jobs" / "ablation.sbatch"), str(config), str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=400)


def test_array_tasks_run_the_trials_and_the_last_job_prints_the_table(slurm, tiny_family, tmp_path):
    env, log = slurm
    config = small_config(tiny_family, tmp_path / "unused")
    config["qd"].update(generations=3, coefficients={"population": 2})
    path = write_config(tmp_path / "config.yaml", config)
    selection = {"CQD_SEEDS": "5", "CQD_TRIALS": "cma-es nsga2"}
    for task, trial in enumerate(("cma-es", "nsga2")):
        job = submit(path, tmp_path / "ablation", env(SLURM_ARRAY_TASK_ID=str(task), **selection))
        assert job.returncode == 0, job.stderr[-3000:]
        assert f"array task {task}: {tmp_path / 'ablation' / f'{trial}-seed5.yaml'}" in job.stdout
        state = read_state(tmp_path / "ablation" / f"{trial}-seed5" / "state.h5")
        assert state["attrs"]["phase"] == "done" and state["attrs"]["method"] == trial
    assert not log.exists()
    table = submit(path, tmp_path / "ablation", env(**selection))
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| 5 | CMA-ES |" in table.stdout and "| 6 | NSGA-II |" in table.stdout
    assert (tmp_path / "ablation" / "comparison.md").read_text() == table.stdout
    assert (tmp_path / "ablation" / "comparison.png").is_file()
    beyond = submit(path, tmp_path / "ablation", env(SLURM_ARRAY_TASK_ID="2", **selection))
    assert beyond.returncode == 2 and "there are 2 runs (--array=0-1)" in beyond.stderr
