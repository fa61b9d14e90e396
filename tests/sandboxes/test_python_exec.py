"""PythonSandbox: each hostile program is contained (time, processes, memory, files, network, output)."""

import os
import platform
import shutil
import signal
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import cqd_mpi
from cqd_mpi.errors import BackendUnavailable, ConfigError
from cqd_mpi.sandboxes.bootstrap import SECCOMP_ARCHES
from cqd_mpi.sandboxes.python_exec import SANDBOX_UID_BASE, PythonSandbox, SandboxLimits

REPO = Path(cqd_mpi.__file__).resolve().parents[1]
KINDS = [pytest.param(kind, marks=pytest.mark.skipif(shutil.which(kind) is None, reason=f"{kind} is not installed"))
         for kind in ("bwrap", "unshare")]


@pytest.fixture(params=KINDS)
def sandbox(request):
    return PythonSandbox(kind=request.param, limits=SandboxLimits(wall_seconds=10, cpu_seconds=10))


@pytest.fixture
def run(sandbox, tmp_path):
    """Run a snippet in the sandbox from a script file unique to this test."""

    def run_code(code, **kwargs):
        script = tmp_path / f"snippet_{uuid.uuid4().hex[:8]}.py"
        script.write_text(textwrap.dedent(code))
        return sandbox.run(script, **kwargs)

    return run_code


def leftovers(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_runs_a_script_with_stdin_args_and_a_private_work_dir(run):
    result = run(
        """
        import os, sys
        data = sys.stdin.read()
        open("note.txt", "w").write(data)
        print(os.getcwd(), sys.argv[1:], open("note.txt").read(), os.getuid())
        """,
        stdin=b"hello",
        args=["--flag"],
    )
    assert result.started and result.returncode == 0, result.stderr
    cwd, args, text, uid = result.stdout.decode().rsplit(" ", 3)
    assert cwd == "/tmp/work"
    assert args == "['--flag']" and text == "hello"
    if os.geteuid() == 0:
        assert int(uid) >= SANDBOX_UID_BASE


def test_infinite_loop_is_killed_at_the_wall_clock(run, tmp_path):
    start = time.monotonic()
    result = run("while True:\n    pass\n", limits=SandboxLimits(wall_seconds=1.5, cpu_seconds=30))
    assert result.timed_out
    assert 1.4 < result.seconds < 6
    assert time.monotonic() - start < 8
    assert leftovers(str(tmp_path)) == []


def test_fork_bomb_is_bounded_and_leaves_no_process(run, tmp_path):
    result = run(
        """
        import os, sys
        children = failures = 0
        for _ in range(2000):
            try:
                if os.fork() == 0:
                    while True:
                        try:
                            os.fork()
                        except OSError:
                            pass
                children += 1
            except OSError:
                failures += 1
        print(children, failures, flush=True)
        """,
        limits=SandboxLimits(wall_seconds=4, processes=8),
    )
    children, failures = map(int, result.stdout.split())
    assert children < 8 and failures > 1900
    deadline = time.monotonic() + 5
    while leftovers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(str(tmp_path)) == []


def test_ten_gigabyte_allocation_fails_with_memory_error(run):
    result = run(
        """
        try:
            block = bytearray(10 * 1024**3)
            print("allocated", len(block))
        except MemoryError:
            print("MemoryError")
        """,
        limits=SandboxLimits(memory_bytes=1 << 30),
    )
    assert result.stdout.strip() == b"MemoryError"


def test_writes_outside_the_work_dir_and_deletes_do_not_reach_the_host(run, tmp_path):
    victim = REPO / f".sandbox-victim-{uuid.uuid4().hex[:8]}"
    escape = REPO / f".sandbox-escape-{uuid.uuid4().hex[:8]}"
    hidden = tmp_path / "hidden.txt"
    victim.write_text("keep me")
    hidden.write_text("keep me too")
    try:
        result = run(
            f"""
            import os, shutil
            outcomes = []
            for action in (
                lambda: open({str(escape)!r}, "w").write("escaped"),
                lambda: open({str(victim)!r}, "a").write("changed"),
                lambda: os.unlink({str(victim)!r}),
                lambda: os.unlink({str(hidden)!r}),
                lambda: shutil.rmtree({str(tmp_path)!r}),
                lambda: open("/usr/cqd-escape", "w"),
                lambda: os.rename({str(victim)!r}, "/tmp/work/moved"),
            ):
                try:
                    action()
                    outcomes.append("done")
                except OSError as exc:
                    outcomes.append(type(exc).__name__)
            open("inside.txt", "w").write("ok")
            print(outcomes, os.listdir("."))
            """
        )
        assert result.returncode == 0, result.stderr
        assert "done" not in result.stdout.decode().split("]")[0]
        assert "inside.txt" in result.stdout.decode()
        assert victim.read_text() == "keep me"
        assert hidden.read_text() == "keep me too"
        assert not escape.exists()
        assert not Path("/usr/cqd-escape").exists()
    finally:
        victim.unlink(missing_ok=True)
        escape.unlink(missing_ok=True)


def test_sockets_reach_nothing(run):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = run(
            f"""
            import socket
            for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
                try:
                    socket.create_connection(address, timeout=2).sendall(b"leak")
                    print("connected", address)
                except OSError as exc:
                    print("refused", type(exc).__name__)
            """
        )
        assert result.stdout.decode().count("refused") == 2, result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_huge_output_is_capped_and_stops_the_program(run):
    limits = SandboxLimits(wall_seconds=10, stdout_bytes=1 << 16, stderr_bytes=1 << 12)
    start = time.monotonic()
    for stream in (1, 2):
        result = run(f"import os\nwhile True:\n    os.write({stream}, b'x' * 65536)\n", limits=limits)
        assert result.output_exceeded and not result.timed_out
        assert len(result.stdout) <= 1 << 16 and len(result.stderr) <= 1 << 12
    assert time.monotonic() - start < 8


def test_exit_codes_and_early_exits_are_reported(run):
    exited = run("import os\nos._exit(3)\n")
    assert exited.started and exited.returncode == 3 and exited.killed_by is None
    segfault = run("import ctypes\nctypes.string_at(0)\n")
    assert segfault.killed_by == signal.SIGSEGV
    raised = run("import sys\nsys.exit(0)\nprint('after')\n")
    assert raised.returncode == 0 and b"after" not in raised.stdout


def test_file_size_and_cpu_limits(run):
    too_big = run(
        """
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            with open("big", "wb") as handle:
                handle.write(b"x" * (8 << 20))
            print("wrote")
        except OSError as exc:
            print(exc.errno)
        """,
        limits=SandboxLimits(file_bytes=1 << 20),
    )
    assert too_big.stdout.strip() == b"27"
    start = time.monotonic()
    busy = run("while True:\n    pass\n", limits=SandboxLimits(wall_seconds=30, cpu_seconds=1))
    assert not busy.timed_out
    assert busy.killed_by == signal.SIGXCPU
    assert time.monotonic() - start < 20


def test_auto_uses_a_working_mechanism():
    sandbox = PythonSandbox(kind="auto")
    assert sandbox.kind == ("bwrap" if shutil.which("bwrap") else "unshare")
    assert sandbox.check() == (True, f"{sandbox.kind} sandbox works")


def test_missing_mechanism_is_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox = PythonSandbox(kind="bwrap")
    with pytest.raises(BackendUnavailable, match=r"bwrap: 'bwrap' is not on PATH.*apt-get install bubblewrap"):
        sandbox.kind  # noqa: B018
    ok, message = sandbox.check()
    assert not ok and "not on PATH" in message


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"sandbox: expected 'auto', 'bwrap' or 'unshare', got 'docker'"):
        PythonSandbox(kind="docker")
    with pytest.raises(ConfigError, match=r"limits\.memory_bytes: expected a positive number, got 0"):
        SandboxLimits(memory_bytes=0)
    with pytest.raises(ConfigError, match="does not exist"):
        PythonSandbox().run(tmp_path / "missing.py")


def test_new_user_namespaces_are_denied(run):
    """unshare(CLONE_NEWUSER), clone with it, clone3 and setns all fail: no capabilities to gain."""
    numbers = SECCOMP_ARCHES[platform.machine()][1]
    result = run(
        f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
        def attempt(name, *args):
            rc = getattr(libc, name)(*args)
            print(name, "ok" if rc >= 0 else os.strerror(ctypes.get_errno()))
        attempt("unshare", CLONE_NEWUSER)
        attempt("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        SYS_clone, SYS_clone3, SYS_setns = {numbers["clone"]}, {numbers["clone3"]}, {numbers["setns"]}
        pid = libc.syscall(SYS_clone, CLONE_NEWUSER | 17, 0, 0, 0, 0)
        if pid == 0:
            os._exit(0)
        print("clone", "ok" if pid > 0 else os.strerror(ctypes.get_errno()))
        print("clone3", "ok" if libc.syscall(SYS_clone3, 0, 0) >= 0 else os.strerror(ctypes.get_errno()))
        fd = os.open("/proc/self/ns/user", os.O_RDONLY)
        print("setns", "ok" if libc.syscall(SYS_setns, fd, CLONE_NEWUSER) >= 0 else os.strerror(ctypes.get_errno()))
        with open("/proc/self/status") as status:
            print([line.split()[1] for line in status if line.startswith("CapEff")][0])
        import subprocess, threading
        threading.Thread(target=print, args=("thread ok",)).start()
        print(subprocess.run(["/bin/echo", "spawn ok"], capture_output=True).stdout.decode().strip())
        """
    )
    lines = result.stdout.decode().split("\n")
    assert lines[:2] == ["unshare Operation not permitted"] * 2, result
    assert lines[2] == "clone Operation not permitted", result
    assert lines[3] == "clone3 Function not implemented", result
    assert lines[4] == "setns Operation not permitted", result
    assert lines[5] == "0000000000000000", result
    assert lines[6:8] == ["thread ok", "spawn ok"], result
