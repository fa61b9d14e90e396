"""Start one process inside a running bwrap environment: the shell, an init or a check script.

Run by the host's Python as ``python -I -S osenv_enter.py CONFIG_JSON`` with a unix socket
on fd `status_fd`; stdlib only. It joins every namespace of the environment's first process
(`pid`), takes its root, and forks the program there with the environment's limits and
capabilities: `rlimits` (name -> value), the capability bounding set cut to `caps`
(numbers), so a program run as root gets those and no more, and the `seccomp` filter (hex); every signal ignored or blocked by the worker is
reset, and the open-files limit is raised to its hard limit, as in a container. With `pty` the process gets a new
terminal from the environment's own /dev/ptmx, whose master end goes back over the socket.
The socket then carries ``pid N`` (the host pid of the program) or ``error MESSAGE``; this
process waits for the program and exits with its status (128 + signal when it was killed),
and dies, taking the program along, when its parent (the worker) dies.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import sys
import termios

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


def _fail(channel, message):
    try:
        channel.sendall(f"error {message}\n".encode())
    finally:
        os._exit(125)


def _last_cap():
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        return int(handle.read())


def _which(name, path):
    """`name` looked up on PATH as execvp would, without the imports os.execvpe makes after chroot."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{name}: not found on PATH {path}")


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_filter(libc, program):
    """Install a seccomp filter (struct sock_filter[] bytes; cqd_mpi/sandboxes/seccomp.py). Root of
    the environment's user namespace may without no_new_privs, so setuid programs keep working."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _Fprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


def _default_signals():
    """Every signal at its default and none blocked, as a container's first process starts.

    What the worker ignores would be inherited: Python's own SIGPIPE and SIGXFSZ, and SIGINT
    and SIGQUIT of any rank started in the background by a non-interactive shell (`srun ... &`
    in an sbatch script), where bash would then leave Ctrl-C ignored by every command.
    """
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(number) == signal.SIG_IGN:
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def main():
    config = json.loads(sys.argv[1])
    channel = socket.socket(fileno=config["status_fd"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(125)
    target = config["pid"]
    try:
        handles = [(name, os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY)) for name in NAMESPACES
                   if os.path.exists(f"/proc/{target}/ns/{name}")
                   and os.readlink(f"/proc/{target}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}")]
        root = os.open(f"/proc/{target}/root", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        _fail(channel, f"the environment's first process {target} is gone ({exc})")
    if os.geteuid() == 0:
        os.setgroups([])
    for name, fd in handles:
        if libc.setns(fd, 0) != 0:
            _fail(channel, f"setns {name}: {os.strerror(ctypes.get_errno())}")
        os.close(fd)
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as exc:
        _fail(channel, f"cannot become root of the environment's user namespace ({exc})")
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    os.chdir(config.get("cwd", "/"))
    master = slave = None
    if config.get("pty"):
        try:
            master, slave = os.openpty()
        except OSError as exc:
            _fail(channel, f"no terminal in the environment ({exc})")
    keep = set(config.get("caps", []))
    last = _last_cap()
    child = os.fork()
    if child == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if slave is not None:
                os.close(master)
                os.setsid()
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                os.close(slave)
            channel.close()
            _default_signals()
            for name, value in config.get("rlimits", {}).items():
                resource.setrlimit(getattr(resource, name), (value, value))
            _, most = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
            for cap in range(last + 1):
                if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
            program = _which(config["argv"][0], config["env"].get("PATH", ""))
            if config.get("seccomp"):
                _load_filter(libc, bytes.fromhex(config["seccomp"]))
            os.execve(program, config["argv"], config["env"])
        except BaseException as exc:
            os.write(2, f"cqd-enter: cannot start {config['argv'][0]!r}: {exc}\n".encode())
            os._exit(127)
    if slave is not None:
        os.close(slave)
        socket.send_fds(channel, [f"pid {child}\n".encode()], [master])
        os.close(master)
    else:
        channel.sendall(f"pid {child}\n".encode())
    channel.close()
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
