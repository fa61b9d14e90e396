"""The MPI runtime under mpiexec (pip mpich wheel): invariants over rank counts, eval groups,
transports, failures and preemption."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli, wait_for_generation

pytestmark = pytest.mark.mpi
SHM = Path("/dev/shm")

if shutil.which("mpiexec") is None:
    pytest.fail("mpiexec is not on PATH: install the test extra (pip install -e '.[test]'), which brings the mpich wheel",
                pytrace=False)


@pytest.fixture(scope="module")
def one_rank(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-rank")
    config = write_config(root / "config.yaml", small_config(tiny_family, root / "run"))
    result = run_cli("run", config, mpi_ranks=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_mpich_yields_while_waiting_only_where_the_node_has_more_ranks_than_cpus():
    from cqd_mpi.runtime.mpi import ranks_on_this_node, yield_when_oversubscribed

    cpus = len(os.sched_getaffinity(0))
    assert ranks_on_this_node({"MPI_LOCALNRANKS": "3"}) == 3
    assert ranks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "2(x3),5"}) == 5 and ranks_on_this_node({}) is None
    crowded = {"MPI_LOCALNRANKS": str(cpus + 1)}
    assert yield_when_oversubscribed(crowded) and crowded["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"
    for environ in ({"MPI_LOCALNRANKS": str(cpus)}, {},
                    {"MPI_LOCALNRANKS": str(cpus + 1), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "0"}):
        before = dict(environ)
        assert not yield_when_oversubscribed(environ) and environ == before


def mpi_config(tiny_family, tmp_path, **overrides):
    return write_config(tmp_path / "config.yaml", small_config(tiny_family, tmp_path / "run", **overrides))


@pytest.mark.parametrize("ranks", [2, 3])
def test_same_state_for_any_number_of_ranks(one_rank, tiny_family, tmp_path, ranks):
    result = run_cli("run", mpi_config(tiny_family, tmp_path), mpi_ranks=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["world_size"] == ranks
    assert_same_results(one_rank, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "logs").iterdir()) == [f"rank-{r}.log" for r in range(ranks)]


@pytest.mark.parametrize("ranks_per_node", ["1", "2"])
def test_the_inter_node_path_of_the_mpi_transport_gives_the_same_results(one_rank, tiny_family, tmp_path,
                                                                         ranks_per_node):
    """With CQD_MPI_RANKS_PER_NODE the ranks of this machine act as several nodes: node leaders
    receive chunks by MPI_Bcast, their node's workers through the shared-memory window."""
    result = run_cli("run", mpi_config(tiny_family, tmp_path), mpi_ranks=3,
                     env=subprocess_env(CQD_MPI_RANKS_PER_NODE=ranks_per_node))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_results(one_rank, tmp_path / "run")


def test_file_transport_gives_the_same_results(one_rank, tiny_family, tmp_path):
    config = mpi_config(tiny_family, tmp_path, **{"runtime.transport": "file",
                                                   "runtime.staging_dir": str(tmp_path / "staging")})
    result = run_cli("run", config, mpi_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_results(one_rank, tmp_path / "run")
    assert not any((tmp_path / "staging").iterdir())


@pytest.mark.cuda
def test_workers_on_the_gpu_give_the_cpu_results(one_rank, tiny_family, tmp_path):
    """engine.device auto: each worker takes cuda:<local rank mod GPUs> (here two workers share
    one GPU), receives every child into CUDA parameters, and scores as the CPU run does."""
    result = run_cli("run", mpi_config(tiny_family, tmp_path, **{"engine.device": "auto"}), mpi_ranks=3)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (1, 2):
        assert "device='cuda:0'" in (tmp_path / "run" / "logs" / f"rank-{rank}.log").read_text()
    assert_same_results(one_rank, tmp_path / "run")


def test_eval_groups_change_throughput_not_results(tiny_family, tmp_path):
    runs = {}
    for groups in (1, 2):
        root = tmp_path / f"groups-{groups}"
        root.mkdir()
        config = write_config(root / "config.yaml", small_config(
            tiny_family, root / "run", **{"runtime.eval_groups": groups, "runtime.pipeline_depth": 1}))
        result = run_cli("run", config, mpi_ranks=3)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[groups] = root / "run"
    assert_same_results(runs[1], runs[2])


def test_too_many_eval_groups_is_a_clear_error(tiny_family, tmp_path):
    result = run_cli("run", mpi_config(tiny_family, tmp_path, **{"runtime.eval_groups": 3}), mpi_ranks=3)
    assert result.returncode != 0
    assert "runtime.eval_groups: 3 groups need at least 3 worker ranks, but the job has 2" in result.stderr


def test_exception_in_a_worker_aborts_every_rank_quickly(tiny_family, tmp_path):
    config = mpi_config(tiny_family, tmp_path)
    start = time.time()
    result = run_cli("run", config, mpi_ranks=3, env=subprocess_env(CQD_MPI_FAULT="eval@2:raise:3"), timeout=120)
    elapsed = time.time() - start
    assert result.returncode != 0
    assert "[rank 2] Traceback" in result.stderr
    assert "InjectedFault: injected fault at eval (hit 3, rank 2)" in result.stderr
    assert "aborting all 3 ranks" in result.stderr
    assert elapsed < 60
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] == "init"


def test_exception_on_rank_0_during_a_broadcast_aborts_every_rank_and_resumes(one_rank, tiny_family, tmp_path):
    """Rank 0 fails while the workers wait in the child's broadcast: on its way out it joins no
    collective (it used to wait in the stop agreement forever), so the abort ends the job."""
    config = mpi_config(tiny_family, tmp_path)
    registry = tmp_path / "shm-registry"
    start = time.time()
    failed = run_cli("run", config, mpi_ranks=3, timeout=60,
                     env=subprocess_env(CQD_MPI_FAULT="merge@0:raise:6", CQD_MPI_SHM_REGISTRY=registry))
    elapsed = time.time() - start
    assert failed.returncode != 0
    assert "[rank 0] Traceback" in failed.stderr
    assert "InjectedFault: injected fault at merge (hit 6, rank 0)" in failed.stderr
    assert elapsed < 45
    segments = recorded_segments(registry)
    assert segments and not any((SHM / name).exists() for name in segments), "MPI_Abort left its segments"
    resumed = run_cli("run", config, mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(one_rank, tmp_path / "run")


def test_an_evaluation_past_its_deadline_aborts_the_job_naming_it_and_resumes(one_rank, tiny_family, tmp_path):
    """A worker whose task blocks for ever (the `hang` fault at a chunk) ends the job at
    runtime.eval_deadline, with a message naming the rank, the task and the chunk."""
    config = mpi_config(tiny_family, tmp_path, **{"runtime.eval_deadline": 5})
    start = time.time()
    hung = run_cli("run", config, mpi_ranks=3, env=subprocess_env(CQD_MPI_FAULT="chunk@2:hang:20"), timeout=60)
    elapsed = time.time() - start
    assert hung.returncode != 0
    assert re.search(r"\[rank 2\] cqd_mpi: error: chunk \d+ of task '\w+' \(\d+ items, .*\) ran past its "
                     r"deadline of 5 s \(runtime.eval_deadline\)", hung.stderr), hung.stderr[-3000:]
    assert "in wait" in hung.stderr
    assert elapsed < 40
    resumed = run_cli("run", config, mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(one_rank, tmp_path / "run")


def test_a_stopped_worker_is_named_by_rank_0_past_its_deadlines_and_the_rerun_resumes(one_rank, tiny_family, tmp_path):
    """SIGSTOP (the `stop` fault at a chunk): no thread of the worker runs, its own deadline
    included; rank 0 ends the job past the rank's chunks' deadlines plus runtime.eval_grace,
    naming the rank, the task and the chunk."""
    config = mpi_config(tiny_family, tmp_path, **{"runtime.eval_deadline": 2, "runtime.eval_grace": 3})
    process = subprocess.Popen(["mpiexec", "-n", "3", *run_cli_command(config)],
                               env=subprocess_env(CQD_MPI_FAULT="chunk@2:stop:3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "logs" / "rank-2.log"
    stopped_at, pid = None, None
    try:
        deadline = time.time() + 120
        while stopped_at is None and process.poll() is None and time.time() < deadline:
            if pid is None and log.exists() and (found := re.search(r"\(pid (\d+)\)", log.read_text())):
                pid = int(found.group(1))
            if pid is not None and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                stopped_at = time.time()
            time.sleep(0.1)
        _, err = process.communicate(timeout=60)
        ended_at = time.time()
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    assert stopped_at is not None, err[-3000:]
    assert process.returncode != 0
    named = re.search(r"cqd_mpi: error: rank 2 on \S+ \(eval group 0\) sent no scores for model \d+ within "
                      r"([\d.]+) s of receiving it, its chunks' deadlines \(([\d.]+) s, runtime.eval_deadline\) "
                      r"plus runtime.eval_grace \(3 s\): chunk \d+ of task '\w+' \(\d+ items", err)
    assert named, err[-3000:]
    assert float(named.group(1)) == float(named.group(2)) + 3
    assert ended_at - stopped_at < float(named.group(1)) + 3, (ended_at - stopped_at, named.group(0))
    assert named.group(0) in (tmp_path / "run" / "logs" / "lost-ranks.txt").read_text()
    resumed = run_cli("run", config, mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(one_rank, tmp_path / "run")


def recorded_segments(registry: Path) -> set[str]:
    """The shared-memory segments the ranks recorded in this node's registry (runtime/shm.py)."""
    return {s for path in registry.glob("*.json") for s in json.loads(path.read_text())["segments"]}


def test_kill_9_of_the_conductor_then_rerun_resumes_exactly_and_removes_the_leaked_segments(
        one_rank, tiny_family, tmp_path):
    """kill -9 leaves the job's /dev/shm segments; the next start on the node removes them, but
    not those of another live job (tests/runtime/shm_holder.py, recorded in the same registry)."""
    config = mpi_config(tiny_family, tmp_path)
    registry = tmp_path / "shm-registry"
    env = subprocess_env(CQD_MPI_SHM_REGISTRY=registry)
    killed = run_cli("run", config, mpi_ranks=3, env={**env, "CQD_MPI_FAULT": "merge@0:kill:7"}, timeout=120)
    assert killed.returncode != 0
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] == "search"
    leaked = recorded_segments(registry)
    assert leaked and all((SHM / name).exists() for name in leaked)
    holder = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, str(Path(__file__).with_name("shm_holder.py"))],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = set(holder.stdout.readline().split())
        assert held and not held & leaked
        resumed = run_cli("run", config, mpi_ranks=3, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming" in resumed.stdout
        assert not any((SHM / name).exists() for name in leaked)
        assert all((SHM / name).exists() for name in held) and held <= recorded_segments(registry)
    finally:
        holder.communicate(timeout=60)
    assert holder.returncode == 0
    assert_same_results(one_rank, tmp_path / "run")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_a_worker_stops_all_ranks_cleanly_for_requeue(one_rank, tiny_family, tmp_path, sig):
    config = mpi_config(tiny_family, tmp_path)
    process = subprocess.Popen(["mpiexec", "-n", "3", *run_cli_command(config)], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "logs" / "rank-2.log"
    state = tmp_path / "run" / "state.h5"
    pids = []

    def worker_pid_known():
        if not pids and log.exists():
            found = re.search(r"\(pid (\d+)\)", log.read_text())
            pids.extend([int(found.group(1))] if found else [])
        return bool(pids)

    wait_for_generation(tmp_path / "run", 1, also=worker_pid_known)
    pid = pids[0]
    os.kill(pid, sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert f"received {sig.name}" in err
    assert read_state(state)["attrs"]["phase"] != "done"
    resumed = run_cli("run", config, mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(one_rank, tmp_path / "run")


def run_cli_command(config):
    return [sys.executable, "-m", "cqd_mpi", "run", str(config)]
