"""The runtime tests' probe task, slowed down in a SLURM job's first start only.

Each evaluate call sleeps CQD_TEST_EVAL_SLEEP seconds while SLURM_RESTART_COUNT is unset or 0,
so that a signal surely lands in the first start and the requeued start finishes quickly.
Sleeping changes no score: a run of this task has the state of an unslowed one.
"""

from __future__ import annotations

import os
import time

from tests.runtime.probe_task import ProbeTask


class SlowFirstStartTask(ProbeTask):
    def evaluate(self, model, item_ids):
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(float(os.environ.get("CQD_TEST_EVAL_SLEEP", "0")))
        return super().evaluate(model, item_ids)
