"""The in-process runtime (one rank): a whole run, what it leaves on disk, resume rules."""

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cqd_mpi.errors import StateError
from cqd_mpi.merging.weights import ModelDir
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import read_state
from cqd_mpi.runtime.launch import conduct
from tests.conftest import small_config, write_config


@pytest.fixture(scope="module")
def finished_run(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("conductor")
    path = write_config(root / "config.yaml", small_config(tiny_family, root / "run"))
    lines = []
    assert conduct(config_mod.load(path), echo=lines.append) == "done"
    return {"config": path, "run": root / "run", "lines": lines}


def test_run_writes_the_documented_layout(finished_run):
    run = finished_run["run"]
    assert (run / "config.yaml").is_file() and (run / "state.h5").is_file()
    assert (run / "state.h5.bak").is_file()
    assert (run / "final" / "report.json").is_file() and (run / "final" / "config.json").is_file()
    assert (run / "logs").is_dir()
    assert not (run / "staging").exists() or not any((run / "staging").iterdir())


def test_progress_lines_and_final_table(finished_run):
    lines = finished_run["lines"]
    generations = [line for line in lines if line.startswith("gen ")]
    assert len(generations) == 6
    assert "active=beta" in generations[0] and "child=4" in generations[0]
    table = lines[-1]
    for label in ("base", "expert alpha", "naive average", "CycleQD aggregate", "aggregate mean beats"):
        assert label in table


def test_saved_models_are_exactly_the_archive_members(finished_run):
    state = read_state(finished_run["run"] / "state.h5")
    members = {int(m) for name in state["archives"] for m in np.ravel(state["archives"][name]["occupant"]) if m >= 0}
    kinds = state["models"]["kind"]
    children = {m for m in members if kinds[m] == "child"}
    on_disk = {int(p.name) for p in (finished_run["run"] / "models").iterdir()}
    assert on_disk == children
    saved = {i for i, s in enumerate(state["models"]["saved"]) if s and kinds[i] == "child"}
    assert saved == children
    evaluated_children = [i for i, k in enumerate(kinds) if k == "child"]
    assert len(evaluated_children) == 6
    assert np.all(np.isfinite(state["models"]["scores"][evaluated_children]))


def test_every_generation_records_its_timings(finished_run):
    history = read_state(finished_run["run"] / "state.h5")["history"]
    timings = {key: history[f"{key}_s"] for key in ("merge", "transfer", "eval", "total")}
    for key, seconds in timings.items():
        assert seconds.shape == (6,) and np.all(np.isfinite(seconds)) and np.all(seconds >= 0), key
    assert np.all(timings["total"] >= timings["eval"]) and np.all(timings["eval"] > 0)


def test_saved_model_loads_and_gives_the_logits_of_its_weights(finished_run):
    run = RunDir(finished_run["run"])
    model_id = int(next(p.name for p in run.models_dir.iterdir()))
    model = AutoModelForCausalLM.from_pretrained(run.model_dir(model_id)).eval()
    stored = dict(ModelDir(run.model_dir(model_id)).tensors())
    state_dict = model.state_dict()
    for name, tensor in stored.items():
        torch.testing.assert_close(state_dict[name], tensor, rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        logits = model(ids).logits
    clone = AutoModelForCausalLM.from_config(model.config)
    clone.load_state_dict(stored, strict=False)
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, logits)


def test_report_matches_the_state(finished_run):
    report = json.loads((finished_run["run"] / "final" / "report.json").read_text())
    state = read_state(finished_run["run"] / "state.h5")
    aggregate = report["aggregate"]["id"]
    np.testing.assert_allclose(list(report["aggregate"]["test_scores"].values()),
                               state["models"]["test_scores"][aggregate])
    assert report["tasks"] == ["alpha", "beta", "gamma"]
    assert set(report["experts"]) == {"alpha", "beta", "gamma"}
    assert len(report["aggregate_betas"]) == 3 and sum(report["aggregate_betas"]) == pytest.approx(1.0)


def test_rerun_of_a_finished_run_changes_nothing(finished_run):
    before = (finished_run["run"] / "state.h5").read_bytes()
    lines = []
    assert conduct(config_mod.load(finished_run["config"]), echo=lines.append) == "done"
    assert (finished_run["run"] / "state.h5").read_bytes() == before
    assert any("resuming" in line and "phase done" in line for line in lines)


def test_resume_with_a_different_config_is_refused_unless_forced(finished_run, tiny_family, tmp_path):
    changed = small_config(tiny_family, finished_run["run"])
    changed["qd"]["mutation"]["w_max"] = 0.1
    path = write_config(tmp_path / "changed.yaml", changed)
    with pytest.raises(StateError, match=r"(?s)different config.*qd.mutation.w_max: 0.3 -> 0.1.*--force"):
        conduct(config_mod.load(path), echo=lambda _line: None)
    lines = []
    assert conduct(config_mod.load(path), force=True, echo=lines.append) == "done"
    assert "w_max: 0.1" in (finished_run["run"] / "config.yaml").read_text()


def test_a_run_frozen_before_the_newer_mutation_keys_resumes(tiny_family, tmp_path):
    """A config.yaml written before qd.mutation.niter and sketch_dtype existed is read with the
    values that version used, so its run resumes; changing one of them is still refused."""
    config = small_config(tiny_family, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", config)
    assert conduct(config_mod.load(path), echo=lambda _line: None) == "done"
    frozen = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(frozen.read_text())
    del old["qd"]["mutation"]["niter"], old["qd"]["mutation"]["sketch_dtype"]
    frozen.write_text(yaml.safe_dump(old, sort_keys=False))
    assert conduct(config_mod.load(path), echo=lambda _line: None) == "done"
    assert "sketch_dtype: float32" in frozen.read_text()
    config["qd"]["mutation"]["sketch_dtype"] = "bfloat16"
    changed = write_config(tmp_path / "changed.yaml", config)
    with pytest.raises(StateError, match=r"qd.mutation.sketch_dtype: 'float32' -> 'bfloat16'"):
        conduct(config_mod.load(changed), echo=lambda _line: None)


def test_a_second_process_on_the_same_run_dir_is_refused(tiny_family, tmp_path):
    config = config_mod.load(write_config(tmp_path / "c.yaml", small_config(tiny_family, tmp_path / "run")))
    run = RunDir(config.runtime.run_dir)
    run.prepare(config)
    with run.lock(), pytest.raises(StateError, match="in use by another cqd_mpi process"):
        conduct(config, echo=lambda _line: None)


def test_expert_basis_mutation_builds_each_basis_once_and_reuses_it(tiny_family, tmp_path):
    cache = tmp_path / "bases"
    config = small_config(tiny_family, tmp_path / "run", **{"runtime.basis_cache": str(cache)})
    config["qd"]["mutation"].update(basis="expert", rank=3, w_max=0.1)
    config["qd"]["generations"] = 4
    loaded = config_mod.load(write_config(tmp_path / "c.yaml", config))
    assert conduct(loaded, echo=lambda _line: None) == "done"
    bases = sorted(p.name for p in cache.iterdir())
    assert len(bases) == 3 and all("-r3-" in name for name in bases)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    config["runtime"]["run_dir"] = str(tmp_path / "run2")
    assert conduct(config_mod.load(write_config(tmp_path / "c2.yaml", config)), echo=lambda _line: None) == "done"
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def test_stop_signals_get_their_previous_handlers_back_after_a_run(finished_run):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    frozen = config_mod.load(finished_run["run"] / "config.yaml")
    assert conduct(frozen, echo=lambda _line: None) == "done"
    assert {sig: signal.getsignal(sig) for sig in before} == before
