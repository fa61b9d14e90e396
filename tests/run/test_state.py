import copy

import h5py
import numpy as np
import pytest
import yaml

from cqd_mpi.errors import StateError
from cqd_mpi.run.frozen import config_hash
from cqd_mpi.run.state import (
    SCHEMA_VERSION,
    HDF5Backend,
    MemoryBackend,
    from_tree,
    read_state,
    to_tree,
)
from tests.qd.helpers import assert_trees_equal, fake_scores, make_core, run


@pytest.fixture(params=["memory", "hdf5"])
def backend(request, tmp_path):
    if request.param == "memory":
        return MemoryBackend()
    return HDF5Backend(tmp_path / "state.h5")


def midway_core():
    core = make_core(pipeline_depth=1)
    run(core, stop_after=8)
    core.models[5].n_errors = 2
    core.item_scores["search"][5] = {n: np.linspace(0, 1, 5, dtype=np.float32) for n in core.task_names}
    return core


def test_empty_backend_loads_none(backend):
    assert backend.load() is None


def test_reloaded_state_equals_original(backend):
    core = midway_core()
    backend.save(core, attrs={"config": "qd: {}\n", "world_size": 3})
    tree = backend.load_tree()
    assert tree["attrs"]["schema_version"] == SCHEMA_VERSION
    assert tree["attrs"]["world_size"] == 3 and tree["attrs"]["config"] == "qd: {}\n"
    expected = to_tree(core)
    for key in ("schema_version", "package_version", "config", "world_size"):
        tree["attrs"].pop(key)
    assert_trees_equal(expected, tree)


def test_reloaded_core_continues_like_the_original_rng_included(backend):
    core = midway_core()
    backend.save(core)
    restored = backend.load()
    while not core.done:
        a, b = core.ask(), restored.ask()
        assert a == b
        scores = fake_scores(a.model_id)
        core.tell(a.model_id, scores)
        restored.tell(b.model_id, scores)
    assert restored.done
    assert_trees_equal(to_tree(core), to_tree(restored))


def test_saving_again_replaces_the_state(backend):
    core = midway_core()
    backend.save(core)
    run(core)
    backend.save(core)
    assert backend.load().phase == "done"


def test_hdf5_keeps_previous_checkpoint_as_backup(tmp_path):
    backend = HDF5Backend(tmp_path / "state.h5")
    core = midway_core()
    backend.save(core)
    done_before = core.generations_done
    job = core.ask()
    core.tell(job.model_id, fake_scores(job.model_id))
    backend.save(core)
    assert read_state(tmp_path / "state.h5.bak")["attrs"]["generations_done"] == done_before
    assert read_state(tmp_path / "state.h5")["attrs"]["generations_done"] == core.generations_done
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_state_falls_back_to_backup(tmp_path, damage, caplog):
    backend = HDF5Backend(tmp_path / "state.h5")
    core = midway_core()
    backend.save(core)
    backend.save(core)
    path = tmp_path / "state.h5"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])
    assert backend.load().generations_done == core.generations_done
    assert "falling back" in caplog.text and "state.h5" in caplog.text


def test_corrupt_state_without_backup_is_a_clear_error(tmp_path):
    path = tmp_path / "state.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(StateError, match="truncated or corrupt"):
        HDF5Backend(path).load()


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "state.h5"
    HDF5Backend(path, keep_backup=False).save(midway_core())
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(StateError, match=r"schema version 0; this cqd_mpi .* reads version 1"):
        read_state(path)


def test_state_file_is_readable_with_plain_h5py(tmp_path):
    path = tmp_path / "state.h5"
    core = midway_core()
    HDF5Backend(path).save(core, attrs={"config": "x: 1\n", "world_size": 1})
    with h5py.File(path, "r") as f:
        assert list(f.attrs["task_names"]) == list(core.task_names)
        assert f["models/scores"].shape == (len(core.models), 3)
        assert list(f["models/kind"].asstr()[:4]) == ["base", "expert", "expert", "expert"]
        assert f["archives/code/occupant"].dtype == np.int64
        assert np.isnan(f["archives/code/quality"][...][f["archives/code/occupant"][...] < 0]).all()
        assert f["tasks/os"].attrs["n_bins"] == 5
        assert len(f["tasks/os/search_ids"]) + len(f["tasks/os/test_ids"]) == 10
        assert f["history/qd_score"].shape == (core.generations_done, 3)


def test_tree_roundtrip_continues_identically():
    original = make_core(pipeline_depth=1)
    run(original, stop_after=9)
    restored = from_tree(to_tree(original))
    run(original)
    run(restored)
    assert_trees_equal(to_tree(original), to_tree(restored))


RUN = {"qd": {"generations": 6, "n_bins": 5}, "runtime": {"run_dir": "/runs/a", "seed": 3, "eval_groups": 1,
                                                           "threads": None}}


def saved_run(backend, config=RUN, threads=1):
    """A core saved by a backend bound to the run of `config` (as the conductor saves it)."""
    assert backend.resume(config, threads=threads) is None
    core = midway_core()
    backend.save(core, attrs={"config": yaml.safe_dump(config, sort_keys=False)})
    return core


def test_a_saved_state_records_its_config_hash_and_thread_count(backend):
    saved_run(backend, threads=3)
    attrs = backend.load_tree()["attrs"]
    assert attrs["config_hash"] == config_hash(RUN) and len(attrs["config_hash"]) == 64
    assert attrs["threads"] == 3
    neutral = copy.deepcopy(RUN)
    neutral["runtime"].update(eval_groups=4, threads=3)
    assert config_hash(neutral) == config_hash(RUN)
    restored = backend.resume(neutral, threads=3)
    assert restored.generations_done == midway_core().generations_done and not backend.rebound


def test_a_state_of_another_config_is_refused_unless_forced(backend, caplog):
    saved_run(backend)
    other = copy.deepcopy(RUN)
    other["runtime"]["seed"] = 4
    other["qd"]["n_bins"] = 7
    with pytest.raises(StateError, match=r"(?s)holds a run with a different config.*qd.n_bins: 5 -> 7\n"
                                         r"  runtime.seed: 3 -> 4\n.*--force"):
        backend.resume(other, threads=1)
    assert backend.resume(other, threads=1, force=True) is not None and backend.rebound
    assert "resuming" in caplog.text and "changed config (--force)" in caplog.text


def test_a_state_of_another_thread_count_is_refused_unless_forced(backend):
    saved_run(backend, threads=1)
    with pytest.raises(StateError, match=r"computed with 1 torch threads per process, this process has 2; .*"
                                         r"Pin the count with runtime.threads: 1 .*--force"):
        backend.resume(RUN, threads=2)
    assert backend.resume(RUN, threads=2, force=True) is not None
    backend.save(midway_core(), attrs={"config": yaml.safe_dump(RUN)})
    assert backend.load_tree()["attrs"]["threads"] == 2


def test_a_state_from_before_the_binding_is_checked_by_its_config_text(backend, caplog):
    backend.save(midway_core(), attrs={"config": yaml.safe_dump(RUN)})
    assert "config_hash" not in backend.load_tree()["attrs"]
    assert backend.resume(RUN, threads=1) is not None and backend.rebound
    assert "does not record the torch thread count" in caplog.text
    other = copy.deepcopy(RUN)
    other["runtime"]["seed"] = 4
    with pytest.raises(StateError, match=r"runtime.seed: 3 -> 4"):
        backend.resume(other, threads=1)


def overwrite_dataset_bytes(path, dataset="models/scores"):
    """Change bytes of a dataset in place, leaving the HDF5 structure intact."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.float64(0.123456).tobytes())
    with h5py.File(path, "r") as f:
        assert f[dataset][0, 0] == 0.123456


def test_a_changed_dataset_or_attribute_is_damage_and_falls_back_to_the_backup(tmp_path, caplog):
    backend = HDF5Backend(tmp_path / "state.h5")
    core = saved_run(backend)
    backend.save(core)
    overwrite_dataset_bytes(tmp_path / "state.h5")
    tree, source = backend.read()
    assert source == tmp_path / "state.h5.bak" and tree["models"]["scores"][0, 0] != 0.123456
    assert f"{tmp_path / 'state.h5'} is damaged" in caplog.text and "falling back" in caplog.text
    with h5py.File(tmp_path / "state.h5.bak", "a") as f:
        f.attrs["seed"] = 4
    with pytest.raises(StateError, match=r"state.h5 is damaged.*; and the backup is unusable too: .*state.h5.bak "
                                         r"is damaged: its datasets and attributes do not match its checksum"):
        backend.read()
