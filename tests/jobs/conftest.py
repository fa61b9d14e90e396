"""The stand-ins for SLURM's srun and scontrol that the sbatch-script tests share (the real
cluster's tests are tests/jobs/test_slurm.py and test_multinode.py)."""

import os

import pytest

from tests.conftest import REPO, subprocess_env

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, run the command under mpiexec with 2 ranks
# (or, with FAKE_SRUN_GONE set, touch that file and exit 0 at once: a run that stopped);
# jobs/lib.sh's step that clears old shared-memory segments runs as one task.
while [[ "$1" == --* ]]; do shift; done
if [ "$3" = cqd_mpi.runtime.shm ]; then exec "$@"; fi
if [ -n "${FAKE_SRUN_GONE:-}" ]; then touch "$FAKE_SRUN_GONE"; exit 0; fi
exec mpiexec -n 2 "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_LOG"
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "scontrol.log"

    def env(**extra):
        return subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=log,
                              SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=REPO, CQD_ENV="/nonexistent", **extra)

    return env, log
