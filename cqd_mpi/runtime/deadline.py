"""Evaluation deadlines: a chunk of items that runs past its time ends the job, naming it.

A task that blocks for ever (a stuck server, a deadlocked library) would otherwise hang its
worker and, waiting for its results, every other rank. Each chunk a worker scores is watched
by a thread: past `runtime.eval_deadline` it prints which rank, task and chunk overran and
every thread's stack (where it is stuck), then ends the job: MPI_Abort under MPI, exit status
EXIT_STATUS in one process. The state on disk is the last checkpoint, so the job resumes.
faulthandler, which needs no GIL, ends the process GIL_GRACE_S later should the watchdog
thread never get to run (a library that blocks holding the GIL).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import sys
import threading
import time
from collections.abc import Sequence

from cqd_mpi.runtime.ending import end_job

AUTO_CHUNK_S = 300.0
"""`eval_deadline: auto`: seconds a chunk may take besides its items (the engine's set-up)."""
AUTO_ITEM_S = 60.0
"""`eval_deadline: auto`: the model's share of one item (its generations), on top of the
item's own limits (`Task.item_seconds`)."""
EXIT_STATUS = 3
GIL_GRACE_S = 30.0


def chunk_deadline(setting: str | float, task, item_ids: Sequence[str]) -> float:
    """Seconds a chunk of `task`'s items may take: `runtime.eval_deadline`, or for `auto`
    AUTO_CHUNK_S plus, per item, AUTO_ITEM_S and the task's own time limits."""
    if setting != "auto":
        return float(setting)
    return AUTO_CHUNK_S + sum(AUTO_ITEM_S + task.item_seconds(i) for i in item_ids)


def _arm_backstop(seconds: float) -> None:
    """faulthandler's timer, on the process's own stderr (sys.stderr may be a capture without a
    file descriptor, as under pytest or a notebook); skipped where there is none."""
    stream = sys.__stderr__
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=stream)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return


class Watchdog:
    """One thread per process that ends the job when the watched block outlives its deadline."""

    def __init__(self):
        self._cond = threading.Condition()
        self._armed: tuple[float, str] | None = None
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, seconds: float, message: str):
        """Run the block under a deadline of `seconds`; past it print `message` and end the job."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="eval-deadline", daemon=True)
                self._thread.start()
            self._armed = (time.monotonic() + seconds, message)
            self._cond.notify()
        try:
            _arm_backstop(seconds + GIL_GRACE_S)
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            with self._cond:
                self._armed = None
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, message = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                print(message, file=sys.stderr, flush=True)
                with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
                    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
                end_job(EXIT_STATUS)
