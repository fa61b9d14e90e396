"""Tracking (run/tracking.py): TensorBoard events that tensorboard's own reader loads with one
value per generation and tag, across restarts and a kill -9."""

import json
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from cqd_mpi.errors import ConfigError, MissingDependency
from cqd_mpi.run.config import TrackingConfig
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend, from_tree, read_state, to_tree
from cqd_mpi.run.tracking import MARKER, Tracker
from tests.conftest import small_config, subprocess_env, write_config
from tests.qd.helpers import fake_scores, make_core
from tests.runtime.helpers import run_cli, run_command

pytestmark = pytest.mark.slow


def load(log_dir):
    """tensorboard's own reader of the event files under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_one_value_per_generation(events, generations, *, maps_every):
    tags = events.Tags()
    for tag in tags["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        expected = [generations[-1]] if tag.startswith("final/") else list(generations)
        assert steps == expected, (tag, steps)
    images = [e.step for e in events.Images("elite_maps")] if maps_every else []
    assert images == [g for g in generations if g % maps_every == 0]


def tracker(path, **settings):
    return Tracker.from_config(TrackingConfig(tensorboard=True, log_dir=str(path), **settings), RunDir(path),
                               name="t", config={})


@pytest.mark.extra("tracking")
def test_curves_continue_after_a_restart_with_no_step_twice(tmp_path):
    core = make_core(generations=7)
    first = tracker(tmp_path / "tb", maps_every=3)
    restarted_at = None
    while not core.done:
        job = core.ask()
        core.tell(job.model_id, fake_scores(job.model_id), timings={"merge": 0.1, "eval": 0.2})
        if job.phase == "search":
            first.sync(core)
            if job.generation == 4 and restarted_at is None:
                restarted_at = 4
                first.close()
                core = from_tree(to_tree(core))
                first = tracker(tmp_path / "tb", maps_every=3)
                first.sync(core)
    first.final(core)
    first.close()
    events = load(tmp_path / "tb")
    assert_one_value_per_generation(events, range(1, 8), maps_every=3)
    qd = [e.value for e in events.Scalars("archive/os/qd_score")]
    np.testing.assert_allclose(qd, [row.qd_score[1] for row in core.history], rtol=1e-6)
    best = [e.value for e in events.Scalars("archive/db/best_quality")]
    replayed = [float(np.nanmax(archives[2].quality)) for g, archives, _ in core.replay() if g > 0]
    np.testing.assert_allclose(best, replayed, rtol=1e-6)
    entered = [e.value for e in events.Scalars("entered/code")]
    assert entered == [float(row.entered[0]) for row in core.history]
    assert {"final/aggregate/mean", "final/base/code", "final/average/db"} <= set(events.Tags()["scalars"])


@pytest.mark.extra("tracking")
def test_a_tracker_opened_late_writes_the_whole_history_from_the_state(tmp_path):
    core = make_core(generations=5)
    while core.phase != "final":
        job = core.ask()
        core.tell(job.model_id, fake_scores(job.model_id))
    late = tracker(tmp_path / "tb", maps_every=2)
    late.sync(core)
    late.close()
    assert_one_value_per_generation(load(tmp_path / "tb"), range(1, 6), maps_every=2)


@pytest.mark.parametrize(("setting", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_a_friendly_error(tmp_path, monkeypatch, setting, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependency, match=rf"tracking.{setting} needs .*pip install 'cqd_mpi\[tracking\]'"):
        Tracker.from_config(TrackingConfig(**{setting: True}), RunDir(tmp_path), name="t", config={})


def wandb_history(run_dir):
    """The history records of every offline W&B run segment under run_dir, read from the .wandb
    files (W&B's record log: 7-byte header, 32 KiB blocks, records of crc32c, length, type)
    with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("tracking/wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


SYNC = """
import sys
from cqd_mpi.run.config import TrackingConfig
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend
from cqd_mpi.run.tracking import Tracker
run = RunDir(sys.argv[1])
tracker = Tracker.from_config(TrackingConfig(wandb=True, wandb_mode="offline", maps_every=3), run, name="t",
                              config={"qd": {"generations": 6}})
tracker.sync(HDF5Backend(run.state_path).load())
tracker.close()
"""


@pytest.mark.extra("tracking")
@pytest.mark.parametrize("where", ["under-a-file", "/proc/cqd-tensorboard"])
def test_a_log_dir_that_cannot_hold_files_is_one_line_naming_the_key(tmp_path, where):
    (tmp_path / "a-file").write_text("")
    log_dir = tmp_path / "a-file" / "tb" if where == "under-a-file" else Path(where)
    with pytest.raises(ConfigError, match=rf"^tracking.log_dir: expected a directory where event files can be "
                                          rf"written, got {log_dir} \((Not a directory|No such file or directory)\)$"):
        Tracker.from_config(TrackingConfig(tensorboard=True, log_dir=str(log_dir)), RunDir(tmp_path), name="t",
                            config={})


@pytest.mark.extra("tracking")
def test_wandb_offline_continues_the_run_without_repeating_a_step(tmp_path):
    core = make_core(generations=6)
    for stop in (3, 6):
        while core.generations_done < stop:
            job = core.ask()
            core.tell(job.model_id, fake_scores(job.model_id))
        HDF5Backend(tmp_path / "state.h5").save(core)
        synced = run_command([sys.executable, "-c", SYNC, str(tmp_path)], env=subprocess_env(WANDB_SILENT="true"))
        assert synced.returncode == 0, synced.stderr[-2000:]
    rows = wandb_history(tmp_path)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["archive/os/qd_score"] for row in rows] == pytest.approx([r.qd_score[1] for r in core.history])
    assert rows[2]["elite_maps/_type"] == "image-file" and "elite_maps/_type" not in rows[1]
    assert len(list(tmp_path.glob("tracking/wandb/offline-run-*"))) == 2
    assert json.loads((tmp_path / "tracking" / "wandb.json").read_text())["through"] == 6


@pytest.mark.extra("tracking")
@pytest.mark.parametrize("fault", ["eval:kill:7", "track:kill:2"])
def test_a_demo_run_killed_and_resumed_writes_each_generation_once(tiny_family, tmp_path, fault):
    config = small_config(tiny_family, tmp_path / "run")
    config["qd"]["generations"] = 4
    config["tracking"] = {"tensorboard": True, "maps_every": 2}
    path = write_config(tmp_path / "config.yaml", config)
    killed = run_cli("run", path, env=subprocess_env(CQD_MPI_FAULT=fault))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("run", path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = load(tmp_path / "run" / "tensorboard")
    assert_one_value_per_generation(events, range(1, 5), maps_every=2)
    state = read_state(tmp_path / "run" / "state.h5")
    marker = [e.step for e in events.Scalars(MARKER)]
    assert marker == list(state["history"]["generation"])
    coverage = [e.value for e in events.Scalars("archive/beta/coverage")]
    np.testing.assert_allclose(coverage, state["history"]["coverage"][:, 1], rtol=1e-6)
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2
