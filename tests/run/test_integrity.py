"""Weights that cannot be swapped (run/integrity.py): one run stopped after generation 3 and
resumed after its base's and experts' files, a saved child, or digests.json were changed."""

import json
import shutil

import pytest

from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.errors import StateError
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import read_state
from cqd_mpi.run.store import ModelStore
from cqd_mpi.runtime.launch import conduct
from cqd_mpi.runtime.signals import StopFlag
from tests.conftest import small_config, write_config
from tests.runtime.helpers import assert_same_results, run_cli

pytestmark = pytest.mark.slow

GENERATIONS = 8


def run(path, *, stop_after=None):
    stop, lines = StopFlag(), []

    def echo(line):
        lines.append(line)
        if stop_after is not None and line.startswith(f"gen {stop_after:>4}/"):
            stop.set("test")

    return conduct(config_mod.load(path), stop=stop, echo=echo), lines


def config_file(family, root, name):
    config = small_config(family, root / name)
    config["qd"]["generations"] = GENERATIONS
    return write_config(root / f"{name}.yaml", config)


@pytest.fixture(scope="module")
def runs(tiny_family, tmp_path_factory):
    """An uninterrupted run, and the same run stopped after generation 3, over experts of its own
    (the tests swap their files and put them back)."""
    root = tmp_path_factory.mktemp("integrity")
    family = {"base": tiny_family["base"],
              "experts": {n: shutil.copytree(p, root / f"expert-{n}") for n, p in tiny_family["experts"].items()}}
    assert run(config_file(family, root, "plain"))[0] == "done"
    config = config_file(family, root, "stopped")
    assert run(config, stop_after=3)[0] == "stopped"
    shutil.copytree(root / "stopped", root / "pristine")
    return {"root": root, "family": family, "plain": root / "plain", "config": config, "stopped": root / "stopped"}


@pytest.fixture
def resumable(runs):
    """The stopped run as it was stopped (its config and dir), the first saved child the resumed
    run reads as a parent (from the uninterrupted run's records), and the other saved children."""
    config, run_dir = runs["config"], runs["stopped"]
    shutil.rmtree(run_dir)
    shutil.copytree(runs["root"] / "pristine", run_dir)
    first = int(read_state(run_dir / "state.h5")["pending"]["model_id"][0])
    models = read_state(runs["plain"] / "state.h5")["models"]
    on_disk = {int(p.name) for p in (run_dir / "models").iterdir()}
    victim = next(p for m in range(first, len(models["id"])) for p in (models["parent1"][m], models["parent2"][m])
                  if int(p) in on_disk)
    return config, run_dir, int(victim), sorted(on_disk - {int(victim)})


def test_an_expert_swapped_between_stop_and_resume_is_refused_then_resumes_once_restored(runs, resumable):
    config, run_dir, _, _ = resumable
    expert = runs["family"]["experts"]["beta"] / "model.safetensors"
    original = expert.read_bytes()
    state = (run_dir / "state.h5").read_bytes()
    try:
        shutil.copyfile(runs["family"]["experts"]["alpha"] / "model.safetensors", expert)
        refused = run_cli("run", config)
    finally:
        expert.write_bytes(original)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("cqd_mpi: error:")]
    assert len(error) == 1, refused.stderr[-2000:]
    assert f"{expert} (expert of task 'beta') changed since the run's first start" in error[0]
    assert "restore it and run again" in error[0] and "--force" in error[0]
    assert (run_dir / "state.h5").read_bytes() == state
    recorded = json.loads(read_state(run_dir / "state.h5")["attrs"]["inputs"])
    assert str(expert) in recorded and str(runs["family"]["base"] / "model.safetensors") in recorded
    assert run(config)[0] == "done"
    assert_same_results(runs["plain"], run_dir)


def test_a_saved_child_swapped_is_refused_when_read_as_a_parent(resumable):
    config, run_dir, victim, others = resumable
    weights = run_dir / "models" / str(victim) / "model.safetensors"
    original = weights.read_bytes()
    shutil.copyfile(run_dir / "models" / str(others[0]) / "model.safetensors", weights)
    with pytest.raises(StateError, match=rf"child #{victim}'s weights in \S+ do not match its digest in \S+digests.json"):
        run(config)
    weights.write_bytes(original)
    # Checked once per process: read again, the child is not hashed again until its file changes.
    store = ModelStore(core=RunState.load(run_dir).core, rundir=RunDir(run_dir))
    store.path(victim)
    store.path(victim)
    assert store.verified == 1
    shutil.copyfile(run_dir / "models" / str(others[0]) / "model.safetensors", weights)
    with pytest.raises(StateError, match=rf"child #{victim}'s weights"):
        store.path(victim)


def test_an_edited_digest_is_reported_and_a_deleted_digests_json_is_rewritten(runs, resumable):
    config, run_dir, victim, _ = resumable
    digests = run_dir / "digests.json"
    original = digests.read_text()
    content = json.loads(original)
    content["digests"][str(victim)] = "sha256:" + "0" * 64
    digests.write_text(json.dumps(content))
    with pytest.raises(StateError, match=rf"child #{victim}'s weights .* do not match its digest .*"
                                         rf"delete the entry \"{victim}\" from digests.json"):
        run(config)
    digests.unlink()
    status, lines = run(config)
    assert status == "done"
    assert any(line.startswith("rewrote digests.json from the") for line in lines)
    assert_same_results(runs["plain"], run_dir)
    rewritten = json.loads(digests.read_text())["digests"]
    plain = json.loads((runs["plain"] / "digests.json").read_text())["digests"]
    assert {p.name for p in (run_dir / "models").iterdir()} <= set(rewritten)
    assert all(plain[m] == digest for m, digest in rewritten.items())
