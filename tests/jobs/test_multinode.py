"""jobs/multi-node.sbatch and jobs/ablation.sbatch on the cluster of env/slurm-multinode.sh (every
node a network namespace with its own hostname, slurmd and /dev/shm): where the ranks land and
how their bytes travel, a preempted job and a job that loses a node, each requeued and resumed to
the state of a one-process run, and the ablation array with its table.

Skipped, saying why, where that cluster is not up; failed under CQD_REQUIRE_MULTINODE=1 (.ci/run).
The jobs are submitted together by one fixture so that their minutes overlap; the job that loses
cqd-n3 is the only one placed there. Few ranks and generations: this module runs beside the rest
of the suite on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqd_mpi.run import config as config_mod
from cqd_mpi.run.state import read_state
from cqd_mpi.runtime.launch import conduct
from cqd_mpi.runtime.mpi import LOST_FILE
from tests.conftest import REPO, small_config, write_config
from tests.jobs.slurm_helpers import job_env, phases, require_cluster, slurm_unavailable, wait_job
from tests.runtime.helpers import assert_same_results

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

MULTINODE = REPO / "env" / "slurm-multinode.sh"
MARKER = "Written by cqd_mpi env/slurm-multinode.sh"
NODES = ("cqd-n1", "cqd-n2", "cqd-n3")
# Every job takes one CPU per node (--overcommit); its first start is slowed (tests/jobs/slow_task.py).
RESOURCES = ["--cpus-per-task=1", "--gpus-per-node=0", "--overcommit", "--time=10", "--signal=B:USR1@60"]
EVAL_SLEEP_S = "0.3"
GENERATIONS = 8


@pytest.fixture(scope="module")
def cluster():
    """The cluster's state dir (the directory of its slurm.conf). CQD_MULTINODE_SLURM_CONF and
    CQD_MULTINODE_PATH (.ci/run, where a one-node cluster is the default) select it for this
    module's SLURM commands; else SLURM_CONF and PATH as they are."""
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    if os.environ.get("CQD_MULTINODE_SLURM_CONF"):
        os.environ["SLURM_CONF"] = os.environ["CQD_MULTINODE_SLURM_CONF"]
    if os.environ.get("CQD_MULTINODE_PATH"):
        os.environ["PATH"] = f"{os.environ['CQD_MULTINODE_PATH']}{os.pathsep}{os.environ['PATH']}"
    try:
        yield multinode_state_dir()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def multinode_state_dir() -> Path:
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    why = slurm_unavailable()
    if why is None and MARKER not in (conf.read_text() if conf.is_file() else ""):
        why = f"SLURM_CONF={conf} is not the multi-node cluster of env/slurm-multinode.sh"
    if why is None:
        listing = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True).stdout
        states = dict(line.split() for line in listing.splitlines() if line.strip())
        down = [node for node in NODES if states.get(node) not in ("idle", "mixed", "allocated")]
        if down:
            why = f"nodes {down} of the multi-node cluster are not up (sinfo: {states})"
    require_cluster(why, 'eval "$(env/slurm-multinode.sh)" starts the multi-node cluster',
                    required_by="CQD_REQUIRE_MULTINODE")
    return conf.parent


def sbatch(script: str, args: list, out: Path, options: list[str], env: dict) -> str:
    job = subprocess.run(["sbatch", "--parsable", f"--output={out}", *options, str(REPO / "jobs" / script),
                          *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def cluster_script(state: Path, *args: str) -> None:
    result = subprocess.run(["bash", str(MULTINODE), *args], env={**os.environ, "CQD_SLURM_MN_STATE": str(state)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def wait_for_line(path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(pattern, path.read_text() if path.exists() else "")
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"no line matching {pattern!r} in {path} after {timeout} s:\n"
                       f"{path.read_text()[-3000:] if path.exists() else '(no output)'}")


def run_processes(job_id: str) -> list[int]:
    """Live `python -m cqd_mpi run` processes of the job, on any node (of this cluster: the
    one-node cluster's job ids are the same numbers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"cqd_mpi\0run" not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job_id}".encode() in environ and b"SLURM_CLUSTER_NAME=cqdmn" in environ:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_ranks_land_on_their_nodes_and_devices_and_talk_over_tcp_between_nodes(cluster):
    """srun's block distribution: the conductor and two workers on the first node, two workers on
    the second; each worker takes cuda:<local rank mod GPUs> of its node (two GPUs simulated); the
    MPI library sees two nodes, and a broadcast crosses the network once (not shared memory)."""
    probe = subprocess.run(["srun", "--mpi=pmi2", "--nodes=2", "--ntasks=5", "--nodelist=cqd-n1,cqd-n2",
                            "--overcommit", "--cpu-bind=none", sys.executable, str(REPO / "tests/jobs/mpi_probe.py")],
                           env=job_env(CQD_PROBE_GPUS="2"), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    ranks, payload = report["ranks"], report["payload"]
    placed = [(r["rank"], r["host"], r["slurm_node"], r["local_rank"]) for r in ranks]
    assert placed == [(0, "cqd-n1", "cqd-n1", 0), (1, "cqd-n1", "cqd-n1", 1), (2, "cqd-n1", "cqd-n1", 2),
                      (3, "cqd-n2", "cqd-n2", 0), (4, "cqd-n2", "cqd-n2", 1)]
    assert [r["device"] for r in ranks[1:]] == ["cuda:1", "cuda:0", "cuda:0", "cuda:1"]
    assert [r["node_ranks"] for r in ranks] == [3, 3, 3, 2, 2]
    assert all(r["payload_ok"] for r in ranks)
    # Node 1's link sent the payload and node 2's received it, once: not through shared memory
    # (the kernel is one: UCX would use it; this cluster's task prolog selects OFI's tcp provider).
    assert all(payload <= r["sent"] < 2 * payload for r in ranks[:3]), ranks
    assert all(payload <= r["received"] < 2 * payload for r in ranks[3:]), ranks


@pytest.fixture(scope="module")
def jobs(cluster, tiny_family, tmp_path_factory):
    """The preempted job (transport mpi, 3 ranks on cqd-n1 and cqd-n2), the job that loses a node
    (transport file, 3 ranks on cqd-n1 and cqd-n3), the ablation array and its table job, all
    submitted at once so that their waits overlap; and the one-process run both multi-node jobs
    must end equal to, computed once while they run on."""
    root = tmp_path_factory.mktemp("multinode")

    def job_config(name, **overrides):
        config = small_config(tiny_family, root / name, **{
            "qd.generations": GENERATIONS, "runtime.threads": 1, "runtime.eval_groups": 2, "runtime.pipeline_depth": 1,
            **overrides})
        for task in config["tasks"]:
            task["kind"] = "tests.jobs.slow_task:SlowFirstStartTask"
        return write_config(root / f"{name}.yaml", config)

    env = job_env(CQD_TEST_EVAL_SLEEP=EVAL_SLEEP_S)
    ablation_env = job_env(CQD_SEEDS="5", CQD_TRIALS="cma-es nsga2")
    ablation = small_config(tiny_family, root / "unused")
    ablation["qd"].update(generations=3, coefficients={"population": 2})
    ablation_config = write_config(root / "ablation.yaml", ablation)
    staging = root / "staging"
    ids = []

    def submit(script, args, out, options, job_env):
        ids.append(sbatch(script, args, out, [*options, *RESOURCES], job_env))
        return ids[-1]

    try:
        jobs = {
            "mpi": {"id": submit("multi-node.sbatch", [job_config("mpi")], root / "mpi.out",
                                 ["--nodes=2", "--ntasks=3", "--nodelist=cqd-n1,cqd-n2"], env),
                    "out": root / "mpi.out", "run": root / "mpi"},
            "lost": {"id": submit("multi-node.sbatch", [job_config("lost", **{
                         "runtime.transport": "file", "runtime.staging_dir": str(staging),
                         "runtime.eval_deadline": 8, "runtime.eval_grace": 5})], root / "lost.out",
                         ["--nodes=2", "--ntasks=3", "--nodelist=cqd-n1,cqd-n3"], env),
                     "out": root / "lost.out", "run": root / "lost", "staging": staging},
        }
        array = submit("ablation.sbatch", [ablation_config, root / "ablation"], root / "ablation-%a.out",
                       ["--array=0-1", "--ntasks=2", "--exclude=cqd-n3"], ablation_env)
        table = submit("ablation.sbatch", [ablation_config, root / "ablation"], root / "table.out",
                       [f"--dependency=afterany:{array}", "--ntasks=1", "--exclude=cqd-n3"], ablation_env)
        jobs["ablation"] = {"array": array, "table": table, "root": root}
        disrupt(jobs["mpi"], jobs["lost"], cluster)
        assert conduct(config_mod.load(job_config("reference")), echo=lambda _line: None) == "done"
        yield {**jobs, "reference": root / "reference"}
    finally:
        for job_id in ids:
            subprocess.run(["scancel", job_id], capture_output=True)


def generations(run_dir: Path) -> int:
    state = run_dir / "state.h5"
    return read_state(state)["attrs"]["generations_done"] if state.exists() else 0


def disrupt(preempted: dict, lost: dict, cluster: Path, timeout: float = 300) -> None:
    """Preempt the first job after its first generation (scancel --signal=USR1: the ranks
    checkpoint and stop, the script requeues) and kill every process of cqd-n3, the second
    job's second node, after its second; whichever comes first, while both run."""
    deadline = time.time() + timeout
    while "killed" not in lost or "signalled" not in preempted:
        assert time.time() < deadline, f"generations after {timeout} s: {generations(preempted['run'])}, " \
                                       f"{generations(lost['run'])}"
        if "signalled" not in preempted and generations(preempted["run"]) >= 1:
            subprocess.run(["scancel", "--signal=USR1", preempted["id"]], check=True, timeout=30)
            preempted["signalled"] = time.time()
        if "killed" not in lost and generations(lost["run"]) >= 2:
            lost["killed"] = time.time()
            cluster_script(cluster, "kill-node", "cqd-n3")
        time.sleep(0.2)


def test_a_lost_node_ends_the_job_naming_it_and_the_requeued_job_resumes(jobs, cluster):
    """kill -9 of every process of cqd-n3 (slurmd, slurmstepd, rank 2) mid-run: rank 0 ends the job
    within the group's deadline naming the node and rank, nothing of the job is left on cqd-n1,
    the script requeues it, and when the node is back (its /dev/shm holding the killed ranks'
    segments, the staging dir a half-written child) the job resumes to the one-process state."""
    job = jobs["lost"]
    node_shm = cluster / "nodes" / "cqd-n3" / "shm"
    try:
        # rank 0's watch of the group (a transfer or stop agreement) or of rank 2's scores, whichever was armed
        lost = wait_for_line(job["out"], r"cqd_mpi: error: (?:eval group 1 \(ranks 2 on cqd-n3\) gave no .* "
                                         r"within (\d+) s: ranks or their node lost|rank 2 on cqd-n3 \(eval group 1\) "
                                         r"sent no scores for model \d+ within (\d+) s)", timeout=240)
        assert time.time() - job["killed"] <= float(lost.group(1) or lost.group(2)) + 20
        wait_for_line(job["out"], rf"ranks were lost .* requeueing job {job['id']}", timeout=180)
        assert run_processes(job["id"]) == []
        stale = sorted(p.name for p in node_shm.glob("mpich_*"))
        assert stale, f"the killed ranks left no segment in {node_shm}"
        half = job["staging"] / "999"
        half.mkdir(parents=True, exist_ok=True)
        (half / "model.safetensors").write_bytes(b"\x80\x00\x00\x00\x00\x00\x00\x00{\"wei")
    finally:
        cluster_script(cluster)  # the node comes back (its slurmd; ReturnToService=2)
    info = wait_job(job["id"], job["out"], timeout=300)
    log = job["out"].read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{log[-3000:]}"
    assert phases(log)[0] == "search" and phases(log)[-1] == "done"
    assert log.count("ranks were lost") == 1
    assert_same_results(jobs["reference"], job["run"])
    assert not any((node_shm / name).exists() for name in stale)
    assert re.search(r"removed \d+ shared-memory segment\(s\) left by ended jobs: .*" + re.escape(stale[0]), log)
    assert not half.exists() and not (job["run"] / "logs" / LOST_FILE).exists()


def test_a_preempted_multi_node_job_requeues_and_resumes_to_the_one_process_state(jobs):
    job = jobs["mpi"]
    info = wait_job(job["id"], job["out"], timeout=300)
    log = job["out"].read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{log[-3000:]}"
    assert "start 1 on 2 node(s), 3 ranks" in log and "received SIGUSR1" in log
    assert phases(log)[0] == "search" and phases(log)[-1] == "done"
    assert re.search(rf"resuming .*: phase \w+, generation \d+/{GENERATIONS}", log)
    assert_same_results(jobs["reference"], job["run"])
    # one eval group per node: rank 1 beside the conductor on cqd-n1, rank 2 on cqd-n2 (block distribution)
    for rank, group in ((1, 0), (2, 1)):
        assert f"in eval group {group}" in (job["run"] / "logs" / f"rank-{rank}.log").read_text()


def test_the_ablation_array_runs_on_the_cluster_and_the_last_job_prints_the_table(jobs):
    ablation = jobs["ablation"]
    root = ablation["root"]
    for task, trial in enumerate(("cma-es", "nsga2")):
        out = root / f"ablation-{task}.out"
        info = wait_job(f"{ablation['array']}_{task}", out, timeout=400)
        assert info["JobState"] == "COMPLETED", f"{info}\n{out.read_text()[-3000:] if out.exists() else ''}"
        assert info["BatchHost"] in NODES[:2]
        state = read_state(root / "ablation" / f"{trial}-seed5" / "state.h5")
        assert state["attrs"]["phase"] == "done" and state["attrs"]["method"] == trial
    info = wait_job(ablation["table"], root / "table.out", timeout=120)
    table = (root / "ablation" / "comparison.md").read_text()
    assert info["JobState"] == "COMPLETED" and "| 5 | CMA-ES |" in table and "| 6 | NSGA-II |" in table
