"""A CycleQD run whose three skills are lm-eval tasks (multiple choice, generate_until with a
regex filter, loglikelihood) under mpiexec -n 3 (a conductor and two workers), killed (kill -9)
during an evaluation and resumed, ends in the state of the uninterrupted one-process run (one
worker): the same state with one and two workers, after a crash."""

from __future__ import annotations

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import probe_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli

SKILLS = {"alpha": "cqd_mc", "beta": "cqd_gen", "gamma": "cqd_ll"}


def lm_eval_config(family, run_dir, lmeval_dir) -> dict:
    config = probe_config(family, run_dir)
    config["tasks"] = [{"name": name, "kind": "lm-eval", "batch_size": 5,
                        "settings": {"task": task, "include_path": str(lmeval_dir)}}
                       for name, task in SKILLS.items()]
    config["qd"]["generations"] = 3
    return config


@pytest.mark.mpi
@pytest.mark.slow
def test_lm_eval_skills_run_resume_and_match_across_rank_counts(tiny_family, lmeval_dir, tmp_path):
    runs = {}
    for label in ("one-worker", "killed"):
        (tmp_path / label).mkdir()
        runs[label] = write_config(tmp_path / label / "config.yaml",
                                   lm_eval_config(tiny_family, tmp_path / label / "run", lmeval_dir))
    single = run_cli("run", runs["one-worker"])
    assert single.returncode == 0, single.stderr[-3000:]
    state = read_state(tmp_path / "one-worker" / "run" / "state.h5")
    assert state["attrs"]["phase"] == "done"

    killed = run_cli("run", runs["killed"], mpi_ranks=3, env=subprocess_env(CQD_MPI_FAULT="eval@1:kill:3"))
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert read_state(tmp_path / "killed" / "run" / "state.h5")["attrs"]["phase"] != "done"
    resumed = run_cli("run", runs["killed"], mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(tmp_path / "one-worker" / "run", tmp_path / "killed" / "run")
