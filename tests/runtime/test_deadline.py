"""runtime.eval_deadline: `auto` adds up each item's own limits from the task's settings."""

import contextlib
import io
import time
from pathlib import Path

import pytest

from cqd_mpi import schema
from cqd_mpi.runtime.deadline import AUTO_CHUNK_S, AUTO_ITEM_S, Watchdog, chunk_deadline
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.dbbench import DBBenchTask
from cqd_mpi.tasks.mbpp import JUDGE_ITEM_SECONDS, MbppPlusTask
from cqd_mpi.tasks.mbpp.harness import CHECK_SLACK_SECONDS
from cqd_mpi.tasks.os_interaction import OSInteractionTask
from tests.runtime.probe_task import ProbeTask

MBPP = Path(__file__).resolve().parents[1] / "fixtures" / "mbpp" / "MbppPlus-fixture.jsonl"


def build(cls, settings, data=__file__):
    return cls(name="t", data=str(data), settings=schema.build(cls.Settings, settings, "settings"),
               context=TaskContext())


def test_auto_sizes_a_chunk_from_its_items_and_their_limits():
    ids = ["0", "1", "2"]
    assert chunk_deadline("auto", build(ProbeTask, {}), ids) == AUTO_CHUNK_S + 3 * AUTO_ITEM_S
    db = build(DBBenchTask, {"max_rounds": 5, "statement_seconds": 10})
    assert chunk_deadline("auto", db, ids) == AUTO_CHUNK_S + 3 * (AUTO_ITEM_S + 7 * 10)
    os_task = build(OSInteractionTask, {"repeats": 2, "environment": {
        "item_seconds": 100, "command_seconds": 20, "script_seconds": 30}})
    assert chunk_deadline("auto", os_task, ids) == AUTO_CHUNK_S + 3 * (AUTO_ITEM_S + 2 * 150)
    mbpp = build(MbppPlusTask, {"timeout_seconds": 20, "startup_seconds": 5, "judge_seconds": 2}, MBPP)
    item = mbpp.item_ids()[0]
    judge = 5 + 2 * len(mbpp.inputs(item)) + JUDGE_ITEM_SECONDS
    limits, base = mbpp.time_limits(item), len(mbpp.problems[item]["base_input"])
    checks = [sum(limits[:base])] + ([sum(limits[base:])] if len(limits) > base else [])
    run = 5 + sum(min(20, c) + CHECK_SLACK_SECONDS for c in checks)  # start-up, then each check capped at 20 s
    assert mbpp.run_wall(item) == run
    assert chunk_deadline("auto", mbpp, [item]) == AUTO_CHUNK_S + AUTO_ITEM_S + 2 * (run + judge)
    assert chunk_deadline(12.5, db, ids) == 12.5


def test_a_watch_is_disarmed_on_the_way_out_even_where_stderr_has_no_file_descriptor():
    """As in a notebook or under pytest's capture: the block runs, and nothing is left armed to
    end the process later (a watch left armed would exit the host process minutes after)."""
    watchdog = Watchdog()
    with contextlib.redirect_stderr(io.StringIO()):
        with watchdog.watch(0.3, "not reached"):
            pass
        with pytest.raises(KeyError), watchdog.watch(0.3, "not reached"):
            raise KeyError("the block's own error")
    assert watchdog._armed is None
    time.sleep(0.6)
