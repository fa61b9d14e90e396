"""The xdist groups (tests/conftest.py): every test module that touches a machine-wide resource
runs in that resource's group, so two of them never run at once."""

import re
from pathlib import Path

from tests.conftest import REPO, SHARED_RESOURCES, xdist_group_of

# What in a test module's source means it uses a machine-wide resource, and which group owns it.
USES = {
    "slurm": re.compile(r"\bsbatch\b|\bsrun\b"),
    "vllm": re.compile(r"CQD_VLLM_PYTHON"),
    "sandboxes": re.compile(r"Path\(\"/proc\"\)|osenv_helpers|bwrap|DOCKER_HOST|127\.0\.0\.1:3306|mysql://"),
}


def test_every_module_using_a_shared_resource_is_in_a_resource_group():
    """By its path: a test module in another place would have to mark every such test."""
    wrong = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path == Path(__file__).resolve():
            continue
        relative = path.relative_to(REPO / "tests").as_posix()
        source = path.read_text()
        used = [name for name, pattern in USES.items() if pattern.search(source)]
        if used and xdist_group_of(relative) not in SHARED_RESOURCES:
            wrong.append(f"{relative} uses {used} but runs in its own group")
    assert not wrong, wrong


def test_groups_name_existing_modules():
    for prefixes in SHARED_RESOURCES.values():
        for prefix in prefixes:
            assert (Path(REPO / "tests" / prefix)).exists(), prefix
    assert xdist_group_of("qd/test_archive.py") == "qd/test_archive.py"
    assert xdist_group_of("jobs/test_slurm.py") == "slurm"
    assert xdist_group_of("tasks/test_mbpp.py") == "code-judges" and xdist_group_of("sandboxes/test_osenv.py") == "sandboxes"
    assert xdist_group_of("jobs/test_multinode.py", ("slow", "mpi")) == "multinode"
    assert xdist_group_of("tasks/test_other.py", ("slow", "mpi")) == "tasks/test_other.py"
    assert xdist_group_of("runtime/test_mpi.py", ("mpi",)) == "runtime/test_mpi.py"


def test_every_module_starting_mpi_jobs_is_marked_mpi():
    """The `mpi` marker starts a module's group early (conftest.start_order): an unmarked
    module of MPI jobs would start last and hold the suite's end."""
    starts_jobs = re.compile(r"mpi_ranks=|\"mpiexec\"")
    unmarked = [path.relative_to(REPO / "tests").as_posix() for path in sorted((REPO / "tests").rglob("test_*.py"))
                if path != Path(__file__).resolve() and starts_jobs.search(path.read_text())
                and "pytest.mark.mpi" not in path.read_text()]
    assert not unmarked, unmarked


def test_scans_for_another_groups_processes_are_scoped():
    """A /proc scan for evalplus harnesses belongs to "code-judges", which starts them all; a scan
    for OS environments outside "sandboxes" must name its own runs' scope (CQD_TEST_SCOPE)."""
    wrong = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path == Path(__file__).resolve():
            continue
        relative, source = path.relative_to(REPO / "tests").as_posix(), path.read_text()
        group = xdist_group_of(relative)
        if 'b"evalplus_harness"' in source and group != "code-judges":
            wrong.append(f"{relative} scans for evalplus harnesses in group {group}")
        if 'b"cqd-outer"' in source and group != "sandboxes" and "CQD_TEST_SCOPE" not in source:
            wrong.append(f"{relative} scans for OS environments in group {group} without CQD_TEST_SCOPE")
    assert not wrong, wrong
