"""Stop signals that come during start-up, before a rank has installed its StopFlag."""

import os
import signal

from cqd_mpi.runtime import signals
from cqd_mpi.runtime.signals import STOP_SIGNALS, StopFlag


def test_a_stop_signal_before_the_flag_is_installed_stops_the_run_all_the_same():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        signals.catch_early()  # as mpi.world() does right after MPI_Init
        os.kill(os.getpid(), signal.SIGUSR1)
        flag = StopFlag().install()
        assert flag and flag.signal_name == "SIGUSR1"
        flag.uninstall()
        assert not StopFlag().install(), "an early signal stops the first flag only"
    finally:
        signals._early.clear()
        for sig, handler in before.items():
            signal.signal(sig, handler)
