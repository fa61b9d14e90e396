"""Fault injection for the crash-and-resume tests: die or raise at a named point of a run.

Off unless CQD_MPI_FAULT is set to ``POINT[@RANK]:ACTION[:HIT]``: on the HIT-th time (1 by
default) this process reaches POINT (merge, eval: a worker starts scoring a model, chunk: it
starts one chunk of items, checkpoint, track, os-setup: an OS item's environment has just
started, save-model: a model's weights are being written), on rank RANK (any when left out),
ACTION happens: ``kill`` (SIGKILL to itself, as a node failure would), ``raise``, ``hang`` (block
for ever, as a stuck server would), ``stop`` (SIGSTOP to itself: no thread of it runs, as in a
swapped-out or kernel-hung process), or ``enospc`` (the OSError a full disk raises, naming the
path the point passes).
"""

from __future__ import annotations

import errno
import os
import signal
import threading

_hits: dict[str, int] = {}
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


class InjectedFault(RuntimeError):
    """Raised by an injected `raise` fault."""


def _rank() -> int:
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def point(name: str, path: str | os.PathLike | None = None) -> None:
    spec = os.environ.get("CQD_MPI_FAULT")
    if not spec:
        return
    target, action, *rest = spec.split(":")
    where, _, rank = target.partition("@")
    if where != name or (rank and int(rank) != _rank()):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(rest[0] if rest else 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected fault at {name} (hit {_hits[name]}, rank {_rank()})")
    elif action == "hang":
        threading.Event().wait()
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else os.fspath(path))
    else:
        raise ValueError(f"CQD_MPI_FAULT: unknown action {action!r}; expected kill, raise, hang, stop or enospc")
