"""A state resumes only in the run it belongs to: not under another run's config, not after
its config.yaml was lost and the settings changed, not with another torch thread count."""

import shutil

import pytest
import torch
import yaml

from cqd_mpi.errors import StateError
from cqd_mpi.run import config as config_mod
from cqd_mpi.runtime import launch
from cqd_mpi.runtime.launch import conduct
from tests.conftest import small_config, write_config


def quiet(_line):
    pass


@pytest.fixture(scope="module")
def run_a(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("binding")
    config = small_config(tiny_family, root / "run", **{"qd.generations": 2})
    path = write_config(root / "config.yaml", config)
    assert conduct(config_mod.load(path), echo=quiet) == "done"
    return {"root": root, "config": config, "path": path, "run": root / "run"}


def test_a_state_placed_in_another_run_dir_is_refused(run_a, tmp_path):
    other = small_config_of(run_a, tmp_path / "run")
    other["runtime"]["seed"] = 4
    other["tasks"][0]["bins"] = {"lower": 0.1, "upper": 0.9, "n_bins": 3}
    (tmp_path / "run").mkdir()
    for name in ("state.h5", "state.h5.bak", "models"):
        copy = shutil.copytree if name == "models" else shutil.copy2
        copy(run_a["run"] / name, tmp_path / "run" / name)
    path = write_config(tmp_path / "config.yaml", other)
    with pytest.raises(StateError, match=r"(?s)run/state.h5 holds a run with a different config.*"
                                         r"runtime.run_dir: .*runtime.seed: 3 -> 4.*tasks\[0\].bins: 'auto' -> "):
        conduct(config_mod.load(path), echo=quiet)


def test_after_config_yaml_is_lost_the_state_still_refuses_other_settings(run_a, tmp_path):
    (run_a["run"] / "config.yaml").unlink()
    changed = small_config_of(run_a)
    changed["qd"]["mutation"]["w_max"] = 0.1
    with pytest.raises(StateError, match=r"(?s)different config.*qd.mutation.w_max: 0.3 -> 0.1"):
        conduct(config_mod.load(write_config(tmp_path / "changed.yaml", changed)), echo=quiet)
    assert not (run_a["run"] / "config.yaml").exists()
    lines = []
    assert conduct(config_mod.load(run_a["path"]), echo=lines.append) == "done"
    assert any("resuming" in line for line in lines) and (run_a["run"] / "config.yaml").is_file()


def test_resuming_with_another_thread_count_is_refused_until_it_is_pinned(run_a, tmp_path):
    try:
        torch.set_num_threads(2)
        with pytest.raises(StateError, match=r"computed with 1 torch threads per process, this process has 2; "
                                             r".*Pin the count with runtime.threads: 1"):
            conduct(config_mod.load(run_a["path"]), echo=quiet)
        pinned = small_config_of(run_a)
        pinned["runtime"]["threads"] = 1
        config = config_mod.load(write_config(tmp_path / "pinned.yaml", pinned))
        assert launch.run(config, echo=quiet) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def small_config_of(run_a, run_dir=None):
    config = yaml.safe_load(yaml.safe_dump(run_a["config"]))
    if run_dir is not None:
        config["runtime"]["run_dir"] = str(run_dir)
    return config
