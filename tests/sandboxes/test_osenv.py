"""OS environments on every back-end: the shell, scripts, and hostile commands that must stay inside.

Each hostile case runs on each back-end (bwrap here; docker through podman's socket, marked
`docker`) and asserts what would show an escape: a host file written or read, a process left
over, a connection made, a limit passed, the host's disk or memory filled.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cqd_mpi.sandboxes.osenv import (
    EnvironmentLimit,
    EnvLimits,
    ansi_c_quote,
    clean_output,
    watched,
)
from tests.conftest import subprocess_env
from tests.sandboxes.osenv_helpers import BACKENDS, make_env, processes_in, rootfs_dir


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def env(backend):
    environment = make_env(backend)
    yield environment
    environment.close()


# ------------------------------------------------------------------ the shell


def test_quoting_and_cleaning_follow_bash_and_agentbench():
    assert ansi_c_quote("it's\n\\ok é") == "$'it\\x27s\\x0a\\x5cok \\xc3\\xa9'"
    raw = b"\x1b[?2004l\r\r\nhi \x1b[01;34mdir\x1b[0m\r\n\x1b]0;root@x: /\x07\x1b[?2004h\x07"
    assert clean_output(raw) == "hi dir\r\n"
    assert clean_output(b"\r\r\n\r\nblank first\r\n") == "\r\nblank first\r\n"
    assert clean_output(b"\xff\xfebinary") == "\ufffd\ufffdbinary"


def test_the_shell_persists_directory_variables_and_jobs(env):
    shell = env.shell()
    assert shell.run("cd /tmp; X=41; sleep 30 &").text.startswith("[1] ")
    out = shell.run("echo $((X + 1)) $(pwd); jobs").text
    assert out.startswith("42 /tmp\r\n[1]+  Running") and "sleep 30 &" in out
    multi = shell.run("for i in 1 2; do\n  echo line $i\ndone\ncat <<'EOF'\nhere doc\nEOF")
    assert multi.text == "line 1\r\nline 2\r\nhere doc\r\n"
    assert shell.run("true").text == ""
    assert shell.run("hostname; id -u; tty").text == "cqd-os\r\n0\r\n/dev/pts/0\r\n"
    assert shell.run("ls /definitely-missing").text == \
        "ls: cannot access '/definitely-missing': No such file or directory\r\n"


def test_the_shell_reports_its_working_directory_as_bash_prompts_show_it(env):
    """Each prompt reports the shell's cwd (bash's `\\w`: `~` for $HOME), the first one included,
    and the report is taken out of the output: text and raw are what they were. A command that
    prints a report of its own (with or without its BEL) comes before the real one and changes
    nothing; a command interrupted at its time limit has no cwd (the shell's is still known)."""
    shell = env.shell()
    assert shell.cwd == "/"
    out = shell.run("echo hi")
    assert (out.text, out.raw, out.cwd) == ("hi\r\n", "\x1b[?2004l\r\r\nhi\r\n\x1b[?2004h", "/")
    moved = shell.run("cd /tmp")
    assert (moved.text, moved.raw, moved.cwd) == ("", "\x1b[?2004l\r\r\n\x1b[?2004h", "/tmp")
    assert shell.run("cd ~").cwd == "~"
    assert shell.run("mkdir -p sub; cd sub").cwd == "~/sub"
    forged = shell.run("printf '\\e]778;/fake\\a'")
    assert (forged.text, forged.raw, forged.cwd) == ("", "\x1b[?2004l\r\r\n\x1b]778;/fake\x07\x1b[?2004h", "~/sub")
    unterminated = shell.run("printf '\\e]778;/fake'; echo")
    assert unterminated.cwd == "~/sub" and unterminated.raw.endswith("\x1b]778;/fake\r\n\x1b[?2004h")
    assert shell.run("HOME=/tmp; cd /tmp/..").cwd == "/"
    assert shell.run("cd /tmp").cwd == "~"
    slow = shell.run("cd /; sleep 10", seconds=1)
    assert slow.timed_out and slow.cwd is None and shell.cwd == "/"
    assert "778" not in slow.raw


def test_a_shell_that_exits_is_replaced_by_a_fresh_login_shell(env):
    first = env.shell()
    first.run("cd /tmp; touch /root/kept")
    ended = first.run("exit 3")
    assert ended.shell_ended and not first.alive
    second = env.shell()
    assert second is not first
    assert second.run("pwd; ls /root").text == "/\r\nkept\r\n"


def test_scripts_run_as_agentbench_runs_them(env):
    result = env.exec(["bash", "-c", 'echo "$@"; echo oops >&2; exit 3', "--", "a b", "c"])
    assert (result.exit_code, result.output) == (3, b"a b c\noops\n")
    python = env.exec(["python3", "-c", "import sys, os; print(sys.argv[1:], os.getcwd())", "x"])
    assert python.exit_code == 0 and python.output == b"['x'] /\n"
    missing = env.exec(["no-such-program"])
    assert missing.exit_code == 127


def test_environments_see_nothing_of_each_other(backend):
    with make_env(backend) as first, make_env(backend) as second:
        first.shell().run("echo mine > /root/note; sleep 30 &")
        assert second.shell().run("cat /root/note").text.endswith("No such file or directory\r\n")
        assert first.exec(["cat", "/root/note"]).output == b"mine\n"


# -------------------------------------------------------------- hostile commands


def test_a_fork_bomb_is_bounded_and_ends_with_its_command(backend):
    with make_env(backend, processes=48) as env, make_env(backend) as neighbour:
        shell = env.shell()
        started = time.monotonic()
        out = shell.run("bomb() { bomb | bomb & }; bomb; sleep 100")
        assert out.timed_out and time.monotonic() - started < 3 + 2 + 5
        assert len(processes_in(env.pid_namespace)) <= 48 + 8
        assert neighbour.shell().run("echo alive").text == "alive\r\n"
        namespace = env.pid_namespace
    assert processes_in(namespace) == []


def test_rm_rf_root_stays_inside(backend, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("host file")
    with make_env(backend) as env:
        env.shell().run(f"rm -rf --no-preserve-root / 2>/dev/null; ls {canary}")
        assert env.exec(["/bin/true"]).exit_code != 0
    assert canary.read_text() == "host file"
    if backend == "bwrap":
        assert (rootfs_dir() / "usr/bin/python3").exists()
    with make_env(backend) as fresh:
        assert fresh.exec(["python3", "-c", "print(1)"]).output == b"1\n"


def test_host_paths_can_be_neither_written_nor_read(backend, tmp_path, monkeypatch):
    secret = tmp_path / f"secret-{uuid.uuid4().hex}"
    secret.write_text("do not read me")
    monkeypatch.setenv("CQD_HOST_CANARY", "host-environment-value")
    target = tmp_path / "written-from-inside"
    with make_env(backend) as env:
        shell = env.shell()
        out = shell.run(f"cat {secret}; echo pwn > {target}; ls {tmp_path}; echo END").text
        assert "do not read me" not in out and out.endswith("END\r\n")
        seen = shell.run("env; cat /proc/1/environ; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'").text
        assert "host-environment-value" not in seen and "CQD_HOST_CANARY" not in seen
        assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in seen
        mounts = shell.run("cat /proc/self/mountinfo").text
        assert str(rootfs_dir()) not in mounts and str(Path.home()) not in mounts
        assert shell.run("cat /etc/hostname").text.strip() == "cqd-os"
        found = shell.run(f"find / -xdev -name {secret.name} 2>/dev/null; echo END").text
        assert found == "END\r\n"
    assert not target.exists()


def test_no_network_not_even_the_hosts_loopback(env):
    out = env.shell().run(
        "(echo > /dev/tcp/127.0.0.1/3306) 2>&1; echo rc=$?; "
        "python3 -c 'import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex((\"127.0.0.1\", 3306)))'; "
        "python3 -c 'import socket; print(socket.getaddrinfo(\"deb.debian.org\", 80))' 2>&1 | tail -1; "
        "awk -F: 'NR > 2 {print $1}' /proc/net/dev").text
    assert "rc=1" in out and "\r\n111\r\n" in out
    assert "gaierror" in out
    assert out.strip().splitlines()[-1].split() == ["lo"]


def test_a_process_that_outlives_its_item_is_gone_with_the_environment(backend):
    env = make_env(backend)
    shell = env.shell()
    shell.run("nohup sleep 1000 >/dev/null 2>&1 & setsid sleep 1001 & (sleep 1002 &) ; "
              "python3 -c 'import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1003)' &")
    env.exec(["bash", "-c", "setsid sleep 1004 & disown"])
    namespace = env.pid_namespace
    assert len(processes_in(namespace)) >= 5
    env.close()
    deadline = time.monotonic() + 10
    while processes_in(namespace) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in(namespace) == []


def test_an_agent_that_ends_its_environment_fails_only_that_environment(backend):
    """bwrap: pid 1 ignores the agent's signals and its stdin cannot be opened for writing, so the
    environment goes on; docker: the container's first process reads the agent's `exit` and the
    container ends; either way nothing else is touched."""
    with make_env(backend) as env, make_env(backend) as neighbour:
        out = env.shell().run("kill -9 1; kill -TERM 1; kill -9 -1; echo exit > /proc/1/fd/0; sleep 2").text
        if backend == "bwrap":
            assert "/proc/1/fd/0: Permission denied" in out
            assert env.shell().run("echo still here").text == "still here\r\n"
        else:
            with pytest.raises(Exception) as failed:
                env.shell().run("echo still here")
                env.exec(["true"])
            assert not isinstance(failed.value, EnvironmentLimit)
        assert neighbour.shell().run("echo alive").text == "alive\r\n"


def test_sleep_1000_ends_at_the_command_limit_and_the_shell_goes_on(env):
    shell = env.shell()
    started = time.monotonic()
    out = shell.run("echo before; sleep 1000")
    assert out.timed_out and out.text == "before\r\n"
    assert 3 <= time.monotonic() - started < 3 + 2 + 3
    assert shell.run("echo after").text == "after\r\n"


def test_a_command_that_ignores_ctrl_c_costs_its_shell_not_the_item(env):
    shell = env.shell()
    shell.run("cd /tmp")
    out = shell.run("trap '' INT; while :; do sleep 1; done")
    assert out.timed_out and not shell.alive
    assert env.shell().run("pwd").text == "/\r\n"


def test_a_gigabyte_of_output_is_cut_and_stopped_early(env):
    started = time.monotonic()
    out = env.shell().run("head -c 1000000000 /dev/zero | tr '\\0' a")
    assert out.output_exceeded and not out.timed_out
    assert len(out.text) <= env.limits.output_bytes and out.text.startswith("aaaa")
    assert time.monotonic() - started < 3 + 2
    script = env.exec(["bash", "-c", "yes | head -c 1000000000"])
    assert script.output_exceeded and len(script.output) == env.limits.output_bytes


def test_filling_the_disk_stops_at_the_limit(backend):
    before = shutil.disk_usage("/var/lib/containers" if backend == "docker" else "/").free
    with make_env(backend, disk_bytes=48 << 20) as env:
        shell = env.shell()
        try:
            one = shell.run("head -c 200M /dev/zero > /root/big; ls -l /root/big | awk '{print $5}'").text
            assert int(one.strip().splitlines()[-1]) <= 48 << 20
            many = shell.run("for i in $(seq 100); do head -c 8M /dev/zero > /root/f$i || break; done; "
                             "du -sk /root | cut -f1").text
            assert int(many.strip().splitlines()[-1]) <= (48 << 20) // 1024 + 64
        except EnvironmentLimit as stopped:
            assert backend == "docker" and "past its disk limit" in str(stopped)
    assert shutil.disk_usage("/var/lib/containers" if backend == "docker" else "/").free > before - (200 << 20)


def test_memory_is_bounded(env):
    out = env.shell().run("python3 -c 'x = bytearray(2 * 1024**3); print(\"allocated\")' 2>&1 | tail -1; echo rc=$?")
    assert "allocated" not in out.text and "rc=" in out.text


# ------------------------------------------------------------------ lifecycle


def test_freeze_stops_every_process_and_changes_show_what_the_item_altered(env):
    shell = env.shell()
    shell.run("sleep 100 & chmod u+s /usr/bin/find; echo fake > /usr/bin/tree; rm /usr/bin/zip; "
              "echo hi > /root/note; printf x > /usr/local/bin/ls")
    env.freeze()
    states = []
    for pid in processes_in(env.pid_namespace):
        with open(f"/proc/{pid}/stat") as handle:
            states.append(handle.read().rsplit(")", 1)[1].split()[0])
    assert states and set(states) <= {"T", "t"}
    changes = env.changes()
    assert changes["usr/bin/find"] == env.image_entry("usr/bin/find")
    assert changes["usr/bin/tree"][0] == "file" and changes["usr/bin/tree"] != env.image_entry("usr/bin/tree")
    assert changes["usr/bin/zip"] == ("gone", "") and env.image_entry("usr/bin/zip")[0] == "file"
    assert changes["usr/local/bin/ls"][0] == "file" and env.image_entry("usr/local/bin/ls") is None
    assert "root/note" not in changes
    assert env.exec(["cat", "/root/note"]).output == b"hi\n"


def test_watched_paths_are_the_programs_libraries_and_startup_files():
    assert all(watched(p) for p in ("usr/bin/python3", "usr/lib/x86_64-linux-gnu/libc.so.6", "lib64", "bin",
                                   "usr/local/bin/calc", "etc/ld.so.preload", "etc/python3.11/sitecustomize.py",
                                   "usr/local/lib/python3.11/dist-packages/x.pth"))
    assert all(watched(p) for p in ("usr/share/doc", "usr/stock.log", "etc/alternatives/awk"))
    assert not any(watched(p) for p in ("root/note", "etc/passwd", "home/jack/bin/x"))


KILLED_WORKER = """
import sys
from tests.sandboxes.osenv_helpers import make_env
env = make_env(sys.argv[1])
env.shell().run("sleep 1000 & nohup sleep 1001 >/dev/null 2>&1 &")
env.exec(["bash", "-c", "setsid sleep 1002 & disown"])
print(env.pid_namespace, getattr(env, "container", None) and env.container.id, flush=True)
import os, signal
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_with_sigkill_leaves_nothing_running(backend):
    repo = Path(__file__).resolve().parents[2]
    worker = subprocess.run([sys.executable, "-c", KILLED_WORKER, backend], capture_output=True, text=True,
                            env=subprocess_env(), cwd=repo, timeout=120)
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-2000:]
    namespace, container = worker.stdout.split()
    deadline = time.monotonic() + 20
    while processes_in(namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(namespace) == []
    if backend == "docker":
        from tests.sandboxes.osenv_helpers import docker_parts

        client, _ = docker_parts()
        while time.monotonic() < deadline and any(c.id == container for c in client.containers.list(all=True)):
            time.sleep(0.2)
        assert all(c.id != container for c in client.containers.list(all=True))


def test_limits_are_checked():
    with pytest.raises(Exception, match=r"limits\.processes: expected a positive number, got 0"):
        EnvLimits(processes=0)


UNPRIVILEGED = """
import sys
sys.path.insert(0, sys.argv[1])
from cqd_mpi.sandboxes.osenv import EnvLimits
from cqd_mpi.sandboxes.osenv_bwrap import BwrapEnvironment, ensure_rootfs, sandbox_uid
import os
assert os.getuid() == sandbox_uid() != 0
root = ensure_rootfs(sys.argv[2], sys.argv[3])
with BwrapEnvironment(rootfs=root, image="default", limits=EnvLimits(command_seconds=3, processes=40)) as env:
    shell = env.shell()
    print(shell.run("id -u; echo x >> /etc/passwd && echo written; chmod u+s /usr/bin/find; ls -l /usr/bin/find").text)
    shell.run("bomb() { bomb | bomb & }; bomb; sleep 100")
    print("processes", len(env.processes()))
    print(env.exec(["python3", "-c", "print('exec', 6 * 7)"]).output.decode())
    namespace = env.pid_namespace
print("namespace", namespace)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the suite runs unprivileged here, so every bwrap test covers this case")
def test_bwrap_works_without_root():
    """GPU nodes run workers as a plain user: the same environment, and RLIMIT_NPROC holds there too."""
    import tempfile

    from tests.sandboxes.osenv_helpers import ROOTFS

    uid = 1_400_000_777
    with tempfile.TemporaryDirectory(prefix="cqd-unprivileged-", dir="/tmp") as scratch:
        home = Path(scratch)
        home.chmod(0o755)
        os.chown(home, uid, uid)
        _run_unprivileged(uid, home, ROOTFS)


def _run_unprivileged(uid: int, home: Path, rootfs: str) -> None:
    python = sys.executable if _reachable(sys.executable) else shutil.which("python3", path="/usr/bin:/bin")
    assert python, "no Python interpreter an unprivileged user can run"
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([python, "-I", "-c", UNPRIVILEGED, str(repo), rootfs, str(home / "rootfs")],
                         capture_output=True, text=True, timeout=300, cwd="/", user=uid, group=uid, extra_groups=[],
                         env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "0" and lines[1] == "written" and lines[2].startswith("-rwsr-xr-x 1 root root")
    assert int(next(line for line in lines if line.startswith("processes")).split()[1]) <= 40 + 8
    assert "exec 42" in run.stdout
    assert processes_in(next(line for line in lines if line.startswith("namespace")).split()[1]) == []


def _reachable(path: str) -> bool:
    """Whether every directory above `path` lets other users through."""
    current = Path(path).resolve().parent
    while True:
        if not current.stat().st_mode & 0o001:
            return False
        if current == current.parent:
            return True
        current = current.parent


def test_a_shell_hung_up_after_a_timeout_keeps_all_it_printed():
    """A shell whose prompt never comes back after Ctrl-C (a loaded node, a trapped SIGINT) is hung
    up; the last bytes it printed, held back while looking for the prompt, are in the output."""
    import pty

    from cqd_mpi.sandboxes.osenv import PROMPT, FdChannel, Shell

    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("python3", ["python3", "-c", "import os, signal, sys, time\n"
                              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                              "os.system('stty -echo raw')\n"
                              f"sys.stdout.buffer.write({PROMPT!r}); sys.stdout.flush()\n"
                              "sys.stdin.readline()\n"
                              "sys.stdout.write('before\\n'); sys.stdout.flush(); time.sleep(60)"])
    shell = Shell(FdChannel(fd), limits=EnvLimits(command_seconds=1, interrupt_seconds=0.5))
    try:
        shell.start()
        out = shell.run("echo before; sleep 1000")
        assert out.timed_out and not shell.alive
        assert out.text == "before\n", out
    finally:
        shell.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_signals_the_worker_ignores_are_not_ignored_in_the_environment(env):
    """A rank started in the background by a non-interactive shell (`srun ... &` in an sbatch
    script) ignores SIGINT and SIGQUIT; bash would pass that on, and Ctrl-C would stop nothing."""
    before = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGQUIT)}
    try:
        shell = env.shell()
        assert shell.run("grep SigIgn /proc/self/status").text == "SigIgn:\t0000000000000000\r\n"
        out = shell.run("sleep 1000")
        assert out.timed_out and shell.alive
        assert shell.run("echo after").text == "after\r\n"
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
