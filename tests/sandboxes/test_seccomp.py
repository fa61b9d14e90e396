"""The bwrap environments' seccomp filter (cqd_mpi/sandboxes/seccomp.py), tried in real environments:
the kernel keyring cannot carry anything from one item to another (environments share one host
uid, whose keyring every one of them would see), and what Docker's default profile refuses is
refused, while ordinary work goes on.
"""

import pytest

from cqd_mpi.sandboxes import seccomp
from tests.sandboxes.osenv_helpers import make_env

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason="the seccomp filter is x86_64's only")

CALL = ("python3 -c 'import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "r = libc.syscall({}); print(r, ctypes.get_errno())'")
ADD_KEY = CALL.format('248, b\"user\", b\"cqd-secret\", b\"42\", 3, -4')
"""add_key("user", "cqd-secret", "42", 3, KEY_SPEC_USER_KEYRING): the uid's own keyring."""


@pytest.fixture(scope="module")
def pair():
    first, second = make_env("bwrap"), make_env("bwrap")
    yield first, second
    first.close()
    second.close()


def test_a_key_added_in_one_item_is_seen_by_no_other(pair):
    first, second = pair
    shell = first.shell()
    assert shell.run(ADD_KEY).text.split() == ["-1", "1"]  # EPERM, as Docker's profile answers
    assert shell.run(CALL.format("250, 0, -4, 0, 0, 0")).text.split() == ["-1", "1"]  # keyctl(GET_KEYRING_ID)
    assert shell.run(CALL.format('249, b\"user\", b\"cqd-secret\", 0, 0')).text.split() == ["-1", "1"]  # request_key
    assert "cqd-secret" not in second.shell().run("cat /proc/keys; echo end").text  # a concurrent item
    later = make_env("bwrap")
    try:
        assert "cqd-secret" not in later.exec(["cat", "/proc/keys"]).output.decode()  # the next item
    finally:
        later.close()


def test_what_docker_refuses_is_refused_and_ordinary_work_goes_on(pair):
    first, _ = pair
    out = first.shell().run("unshare -Ur true; echo unshare=$?; mount -t tmpfs x /mnt; echo mount=$?; "
                            + CALL.format("435, 0, 0") + "; " + CALL.format("321, 0, 0, 0") + "; "
                            "useradd -m jack && echo user; ls / | wc -l; "
                            "python3 -c 'import subprocess; print(subprocess.run([\"true\"]).returncode)'").text
    lines = out.split()
    assert "unshare=1" in lines and "mount=32" in lines, out
    assert "-1 38" in out and "-1 1" in out  # clone3: ENOSYS (so the C library falls back to clone); bpf: EPERM
    assert "user" in lines and lines[-1] == "0", out
    assert first.exec(["bash", "-c", ADD_KEY]).output.split() == [b"-1", b"1"]  # scripts get the filter too


def test_the_program_is_well_formed():
    program = seccomp.program()
    assert len(program) % 8 == 0 and len(program) // 8 == len(seccomp.REFUSED_X86_64) + 12
    assert {"add_key", "keyctl", "request_key"} <= set(seccomp.REFUSED_X86_64)
