"""tests/forkserver.py: a command forked by the tests' fork server is the command as a subprocess
would run it (tests/runtime/test_mpi.py runs its ranks through it under mpiexec)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import subprocess_env
from tests.forkserver import run_cqd, server_for

PROBE = """
import os, sys
from huggingface_hub import constants
print(os.getpid(), os.getppid(), os.environ.get("PROBE"), constants.HF_HUB_OFFLINE, os.getcwd(),
      repr(sys.stdin.read()), sys.argv[1:])
sys.stdout.flush()
sys.stderr.write("to stderr\\r\\n")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "raise":
    raise ValueError("the probe raised")
if sys.argv[1] == "sleep":
    open("pid", "w").write(str(os.getpid()))
    import time; time.sleep(60)
sys.exit(3)
""".replace("import os, sys", "import os, signal, sys")


def test_a_forked_command_is_its_own_process_and_ends_like_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.delenv("CQD_TEST_FORKSERVER", raising=False)  # this test is of the server, whatever the suite uses
    env = subprocess_env(PROBE="seen")
    server = server_for(env)
    assert server is not None, "an environment that differs in no import-time variable is served"
    (tmp_path / "forkprobe.py").write_text(PROBE)

    def probe(*args, timeout=60):
        return server.run(["forkprobe", *args], list(args), env=env, cwd=str(tmp_path), timeout=timeout,
                          module="forkprobe")

    done = probe("exit")
    pid, ppid, seen, offline, cwd, stdin, argv = done.stdout.split(maxsplit=6)
    assert int(pid) != server.process.pid and int(ppid) == server.process.pid
    assert (seen, cwd, stdin, argv.strip()) == ("seen", str(tmp_path), "''", "['exit']")
    assert offline == "True", "huggingface_hub was imported under cqd_mpi.cli's HF_HUB_OFFLINE=1, as in a run"
    assert done.returncode == 3 and done.stderr == "to stderr\n"  # text=True's universal newlines

    assert probe("kill").returncode == -signal.SIGKILL
    raised = probe("raise")
    assert raised.returncode == 1 and raised.stderr.rstrip().endswith("ValueError: the probe raised")
    with pytest.raises(subprocess.TimeoutExpired):
        probe("sleep", timeout=3)
    sleeper = int((tmp_path / "pid").read_text())
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{sleeper}") and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{sleeper}"), "a command past its timeout is killed and reaped"

    # cqd_mpi itself: the same output and status as a plain `python -m cqd_mpi`.
    bad = tmp_path / "bad.yaml"
    bad.write_text("qd: [\n")
    forked = run_cqd(["run", str(bad)], env=env, timeout=120)
    plain = subprocess.run([sys.executable, "-m", "cqd_mpi", "run", str(bad)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert forked.returncode == 2 and len(forked.stderr.splitlines()) == 1, forked.stderr

    # What the preloaded modules read when imported cannot change in a child: a command with
    # such a variable of its own runs as a plain process, and the server lives on ...
    assert server_for(subprocess_env(HF_HOME=str(tmp_path / "hf"))) is None
    assert server_for({**env, "OMP_NUM_THREADS": "2"}) is None
    assert server_for(env) is server and server.process.poll() is None
    # ... while a change of this worker's own environment starts a server that has it.
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", f"{os.getpid()}")
    moved = server_for(subprocess_env())
    assert moved is not None and moved is not server and server.process.poll() is not None
    assert moved.env["HF_HUB_ETAG_TIMEOUT"] == f"{os.getpid()}"
