"""jobs/single-node.sbatch on a real SLURM cluster (env/slurm-cluster.sh, as in CI; env/slurm-multinode.sh
works too, but see env/README.md): sbatch, srun --mpi=pmi2 with the pip mpich wheel, SLURM's own warning signal and requeue.

Where no cluster answers these tests skip, saying why, unless CQD_REQUIRE_SLURM=1 (as .ci/run
sets it), where they fail. The two long jobs are submitted together (each takes one of the
node's CPUs through --overcommit) so that their minutes overlap.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cqd_mpi.run import config as config_mod
from cqd_mpi.runtime.launch import conduct
from tests.conftest import REPO, small_config, write_config
from tests.jobs.slurm_helpers import job_env, phases, require_cluster, slurm_unavailable, wait_job
from tests.runtime.helpers import assert_same_results, wait_for_generation

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

# Two ranks (conductor + one worker) on one CPU of the node; no GPUs.
RESOURCES = ["--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", "--overcommit"]
# SLURM sends the warning when its 30 s time-limit check finds end - now <= T + 30: with
# --time=2 and T=25 that is 65 to 95 s after the start, and the limit is enforced 30 s or more
# later. Each later start has as long again to finish: with --time=1 a start on a loaded
# machine spent its minute starting its ranks and the job timed out after four requeues.
TIME_LIMIT_WARNING = ["--time=2", "--signal=B:USR1@25"]
# Per chunk in a job's first start (none in later starts): 40 generations take about a minute
# at 0.2 s, so the preempted job is still running when it is signalled; at 0.5 s, about two
# and a half, so the time-limit job's first start outlasts its warning.
EVAL_SLEEP_S = {"time-limit": "0.5", "preempted": "0.2"}


@pytest.fixture(scope="module")
def cluster():
    require_cluster(slurm_unavailable(), "env/slurm-cluster.sh starts a one-node cluster, env/slurm-multinode.sh one of three")


def submit(config: Path, out: Path, options: list[str], env: dict) -> str:
    job = subprocess.run(["sbatch", "--parsable", f"--output={out}", *RESOURCES, *options,
                          str(REPO / "jobs" / "single-node.sbatch"), str(config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def jobs(cluster, tiny_family, tmp_path_factory):
    """The time-limit and preemption jobs (submitted at once), and the uninterrupted run."""
    root = tmp_path_factory.mktemp("slurm")
    submitted = {}

    def job_config(name):
        config = small_config(tiny_family, root / name, **{"qd.generations": 40, "runtime.threads": 1})
        for task in config["tasks"]:
            task["kind"] = "tests.jobs.slow_task:SlowFirstStartTask"
        return write_config(root / f"{name}.yaml", config)

    for name, options in (("time-limit", TIME_LIMIT_WARNING), ("preempted", ["--time=10", "--signal=B:USR1@60"])):
        out = root / f"{name}.out"
        env = job_env(CQD_TEST_EVAL_SLEEP=EVAL_SLEEP_S[name])
        submitted[name] = {"id": submit(job_config(name), out, options, env), "out": out, "run": root / name}
    try:
        assert conduct(config_mod.load(job_config("uninterrupted")), echo=lambda _line: None) == "done"
        yield {**submitted, "uninterrupted": root / "uninterrupted"}
    finally:
        for job in submitted.values():
            subprocess.run(["scancel", job["id"]], capture_output=True)


def assert_resumed_to_the_uninterrupted_state(job, info, reference):
    log = job["out"].read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-3000:]}"
    restarts = int(info["Restarts"])
    assert restarts >= 1, log[-3000:]
    # one start per SLURM_RESTART_COUNT value, each after a checkpoint and a requeue
    assert [int(n) for n in re.findall(r"start (\d+) on", log)] == list(range(1, restarts + 2))
    assert log.count(f"requeueing job {job['id']}") == restarts
    assert phases(log)[0] != "done" and phases(log)[-1] == "done" and len(phases(log)) == restarts + 1
    assert re.search(r"resuming .*: phase \w+, generation \d+/40", log)
    assert_same_results(reference, job["run"])


def test_preemption_signal_checkpoints_requeues_and_resumes_to_the_uninterrupted_state(jobs):
    job = jobs["preempted"]
    wait_for_generation(job["run"], 1, timeout=120)
    # scancel signals the job's steps (the ranks), not the batch shell: the ranks stop cleanly
    # and the script requeues because the run is not done.
    subprocess.run(["scancel", "--signal=USR1", job["id"]], check=True, timeout=30)
    info = wait_job(job["id"], job["out"])
    log = job["out"].read_text()
    assert "received SIGUSR1" in log and "time limit near" not in log
    assert phases(log)[0] == "search"
    assert_resumed_to_the_uninterrupted_state(job, info, jobs["uninterrupted"])


def test_time_limit_warning_checkpoints_requeues_and_resumes_to_the_uninterrupted_state(jobs):
    job = jobs["time-limit"]
    info = wait_job(job["id"], job["out"], timeout=420)
    log = job["out"].read_text()
    assert "time limit near: asking all ranks to checkpoint" in log and "received SIGUSR1" in log
    assert_resumed_to_the_uninterrupted_state(job, info, jobs["uninterrupted"])


def test_a_failing_job_ends_failed_with_its_error_and_is_not_requeued(cluster, tiny_family, tmp_path):
    config = small_config(tiny_family, tmp_path / "run")
    good = write_config(tmp_path / "good.yaml", config)
    config["qd"]["generatoins"] = 3
    bad = write_config(tmp_path / "bad.yaml", config)
    cases = {  # each: the config, the environment, the error the job's output must show
        "bad-config": (bad, job_env(), "qd: unknown key 'generatoins'"),
        # srun without a PMI for this MPI: every rank a world of one, refused before it starts
        "no-pmi": (good, job_env(CQD_SRUN_MPI="none"), "srun started 2 tasks but MPI sees a world of 1"),
    }
    ids = {name: submit(path, tmp_path / f"{name}.out", ["--time=5", "--signal=B:USR1@60"], env)
           for name, (path, env, _) in cases.items()}
    for name, (_, _, error) in cases.items():
        out = tmp_path / f"{name}.out"
        info = wait_job(ids[name], out, timeout=120)
        log = out.read_text()
        status = re.search(r"the run failed \(exit (\d+)\); not requeueing", log)
        assert info["JobState"] == "FAILED" and status, f"{info}\n{log[-3000:]}"
        assert info["ExitCode"] == f"{status.group(1)}:0" and status.group(1) != "0"
        assert info["Restarts"] == "0" and "requeueing job" not in log
        assert error in log
    assert not (tmp_path / "run").exists()
