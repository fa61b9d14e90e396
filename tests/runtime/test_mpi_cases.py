"""tests/runtime/mpi_cases.py, mpi4py's way: every case in-process on COMM_SELF, then all of
them under mpiexec on COMM_WORLD."""

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env
from tests.runtime.helpers import run_command
from tests.runtime.mpi_cases import CASES

CASES_FILE = Path(__file__).with_name("mpi_cases.py")


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_case_in_process_on_comm_self(case):
    from mpi4py import MPI

    case(MPI.COMM_SELF)


@pytest.mark.mpi
def test_every_case_under_mpiexec_on_comm_world():
    result = run_command(["mpiexec", "-n", "3", sys.executable, "-m", "mpi4py", str(CASES_FILE)],
                         env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(CASES)} mpi cases ok on 3 ranks" in result.stdout
