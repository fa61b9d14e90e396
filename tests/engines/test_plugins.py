"""Engines as plug-ins: an engine from outside the package runs a whole run; a task whose
engine lacks its capability is refused at load; `runtime.threads` holds on every rank."""

import re

import pytest

from cqd_mpi.engines import BUILTIN, capabilities, engine_class
from cqd_mpi.errors import ConfigError
from cqd_mpi.run import config as config_mod
from tests.conftest import small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli

PLUGIN = "tests.engines.plugin_engine:PluginEngine"


def test_engine_kinds_resolve_like_task_kinds():
    from tests.engines.plugin_engine import PluginEngine

    assert engine_class(PLUGIN) is PluginEngine
    assert engine_class("transformers").__name__ == "TransformersEngine"
    assert capabilities(PluginEngine) == ["text generation"]
    with pytest.raises(ConfigError, match=r"engine.kind: unknown engine kind 'vlm'; expected one of "
                                          + ", ".join(BUILTIN)):
        engine_class("vlm")
    with pytest.raises(ConfigError, match=r"is not a subclass of cqd_mpi.engines.base.Engine"):
        engine_class("tests.engines.plugin_engine:PluginSettings")


def test_engine_settings_are_checked_by_the_schema_and_frozen_resolved(tiny_family, tmp_path):
    config = small_config(tiny_family, tmp_path / "run")
    config["engine"] = {"kind": PLUGIN, "device": "cpu", "settings": {"batch_size": 4}}
    loaded = config_mod.from_dict(config)
    assert loaded.engine.settings == {"batch_size": 4, "log": None}
    config["engine"]["settings"] = {"batch": 4}
    with pytest.raises(ConfigError, match=r"engine.settings: unknown key 'batch'; expected keys: batch_size, log"):
        config_mod.from_dict(config)


def test_a_config_written_before_engine_settings_reads_as_the_new_one(tiny_family, tmp_path, caplog):
    config = small_config(tiny_family, tmp_path / "run")
    config["engine"] = {"device": "cpu", "chat_template": "instruction-response", "batch_size": 4}
    loaded = config_mod.from_dict(config)
    assert loaded.engine.settings == {"chat_template": "instruction-response", "batch_size": 4}
    assert "engine.batch_size is now engine.settings.batch_size" in caplog.text


def test_a_task_whose_engine_lacks_its_capability_fails_at_load_in_one_line(tiny_family, tmp_path):
    config = small_config(tiny_family, tmp_path / "run")
    config["engine"] = {"kind": "tests.engines.plugin_engine:SilentEngine"}
    path = write_config(tmp_path / "config.yaml", config)
    result = run_cli("run", path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"tasks\[0\]: task 'alpha' \(kind 'tests.runtime.probe_task:ProbeTask'\) needs text "
                     r"generation, which engine 'silent' \(tests.engines.plugin_engine:SilentEngine\) does not "
                     r"provide \(it provides: none\)", lines[0]), lines[0]
    assert not (tmp_path / "run" / "state.h5").exists()


@pytest.mark.mpi
def test_a_plugin_engine_runs_a_whole_run_under_mpi_like_the_transformers_engine(tiny_family, tmp_path):
    reference = tmp_path / "transformers"
    reference.mkdir()
    result = run_cli("run", write_config(reference / "config.yaml", small_config(tiny_family, reference / "run")))
    assert result.returncode == 0, result.stderr[-3000:]

    plugin = tmp_path / "plugin"
    plugin.mkdir()
    log = plugin / "updates.log"
    config = small_config(tiny_family, plugin / "run", **{"runtime.threads": 1})
    config["engine"] = {"kind": PLUGIN, "device": "cpu", "settings": {"batch_size": 8, "log": str(log)}}
    result = run_cli("run", write_config(plugin / "config.yaml", config), mpi_ranks=3,
                     env=subprocess_env(OMP_NUM_THREADS=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_results(reference / "run", plugin / "run")

    from cqd_mpi.merging.weights import ModelDir

    tensors = len(ModelDir(tiny_family["base"]).names)
    updates = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _, _ in updates} == {"1", "2"}
    assert all(int(taken) == tensors for _, taken, _ in updates), updates
    assert all(threads == "1" for _, _, threads in updates), updates
    for rank in range(3):
        text = (plugin / "run" / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank}: 1 torch thread(s)" in text, text[-2000:]
