"""A rank under mpiexec that is forked by the pytest worker's fork server (tests/forkserver.py):
`mpiexec -n N python -S tests/forkclient.py SOCKET ARGS...` starts in milliseconds, hands the
server its stdio, its PMI fd and its environment, and lives as long as the forked rank: it
forwards the signals a launcher or a test sends, and ends with the rank's exit status or its
signal. If the launcher kills it, the server kills the rank. Standard library only (-S)."""

import contextlib
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGCONT)


def main(path: str, args: list[str]) -> None:
    fds_at = [0, 1, 2] + ([int(os.environ["PMI_FD"])] if "PMI_FD" in os.environ else [])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = json.dumps({"args": args, "env": dict(os.environ), "cwd": os.getcwd(), "fds_at": fds_at}).encode()
    message = f"{len(body)}\n".encode() + body
    sent = socket.send_fds(sock, [message], fds_at)
    sock.sendall(message[sent:])
    # This process keeps its copies of these fds until it ends: the launcher takes a rank whose
    # PMI fd or stdio closes for one that ended, and kills its process group.
    replies = b""
    pid = None
    pending = []

    def forward(signum, _frame):
        if pid is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while replies.count(b"\n") < 2:
        data = sock.recv(4096)
        if not data:
            break
        replies += data
        if pid is None and b"\n" in replies:
            pid = int(replies.split(b"\n")[0])
            for signum in pending:
                forward(signum, None)
    lines = replies.split(b"\n")
    if len(lines) < 3:
        sys.stderr.write(f"forkclient: the fork server gave no exit status: {replies!r}\n")
        os._exit(1)
    code = int(lines[1])
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
