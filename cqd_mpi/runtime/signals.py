"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 asks the run to stop at the next generation boundary.

SLURM sends these before a job's time limit (`--signal`) or on preemption. The handler only
sets a flag; the conductor stops issuing work, drains what is in flight, checkpoints and
exits 0 so that a requeued job resumes.
"""

from __future__ import annotations

import logging
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
log = logging.getLogger("cqd_mpi.signals")
_early: list[str] = []


def catch_early() -> None:
    """Keep the stop signals that come before a StopFlag is installed, for the first one.

    Called right after MPI_Init: the mpich wheel's own SIGUSR1 handler (failure notices from
    hydra) would swallow a warning signal during rank 0's set-up, and the workers install
    their flags only when rank 0 is done with it.
    """

    def handler(signum, _frame):
        _early.append(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


class StopFlag:
    def __init__(self):
        self._event = threading.Event()
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.signal_name = reason
        self._event.set()

    def install(self) -> StopFlag:
        """Route the stop signals to this flag (main thread only) until `uninstall()`."""

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            log.warning("received %s: stopping at the next generation boundary", name)
            self.set(name)

        self._previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        if _early:
            log.warning("received %s during start-up: stopping at the next generation boundary", _early[0])
            self.set(_early[0])
            _early.clear()
        return self

    def uninstall(self) -> None:
        """Give the stop signals back to the handlers they had before `install()`."""
        for sig, previous in getattr(self, "_previous", {}).items():
            signal.signal(sig, previous)
        self._previous = {}
