"""The model store (run/store.py): members missing at resume are rebuilt bit for bit or named
as lost, and a disk budget keeps members as recipes without changing any result."""

import logging
import shutil

import pytest
import yaml

from cqd_mpi.analysis.export import Exporter
from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.errors import ConfigError
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.state import read_state
from cqd_mpi.run.store import LostModels
from cqd_mpi.runtime.launch import conduct
from cqd_mpi.runtime.signals import StopFlag
from tests.conftest import small_config, write_config
from tests.qd.helpers import assert_trees_equal
from tests.runtime.helpers import assert_same_results, comparable_state

GENERATIONS = 40


def config_file(family, root, name, **runtime):
    config = small_config(family, root / name)
    config["qd"]["generations"] = GENERATIONS
    config["runtime"].update(runtime)
    return write_config(root / f"{name}.yaml", config)


def run(path, *, stop_after=None, **kwargs):
    """conduct() in this process; with `stop_after`, stopped (as by SIGTERM) after that generation."""
    stop, lines = StopFlag(), []

    def echo(line):
        lines.append(line)
        if stop_after is not None and line.startswith(f"gen {stop_after:>4}/"):
            stop.set("test")

    return conduct(config_mod.load(path), stop=stop, echo=echo, **kwargs), lines


def members(run_dir):
    state = read_state(run_dir / "state.h5")
    kinds = state["models"]["kind"]
    return sorted({int(m) for a in state["archives"].values() for m in a["occupant"].ravel()
                   if m >= 0 and kinds[m] == "child"})


def child_dirs(run_dir):
    return sorted(int(p.name) for p in (run_dir / "models").iterdir())


@pytest.fixture(scope="module")
def runs(tiny_family, tmp_path_factory):
    """The same config run with every member on disk, and with a budget of one byte (every
    member that may go is kept as a recipe)."""
    root = tmp_path_factory.mktemp("store")
    plain = config_file(tiny_family, root, "plain")
    budget = config_file(tiny_family, root, "budget", model_store_bytes="1B")
    assert run(plain)[0] == "done" and run(budget)[0] == "done"
    return {"root": root, "plain": root / "plain", "budget": root / "budget", "budget_config": budget}


def test_a_budget_changes_no_result(runs):
    plain, budget = runs["plain"], runs["budget"]
    assert_trees_equal(comparable_state(plain), comparable_state(budget))
    assert (plain / "final" / "model.safetensors").read_bytes() == (budget / "final" / "model.safetensors").read_bytes()
    assert child_dirs(plain) == members(plain)
    assert len(child_dirs(budget)) < len(members(budget)) // 2


def test_evicted_members_export_bit_for_bit(runs, tmp_path):
    plain, budget = runs["plain"], runs["budget"]
    exporter = Exporter(RunState.load(budget))
    evicted = sorted(set(members(budget)) - set(child_dirs(budget)))
    for m in evicted:
        out = exporter.model(m, tmp_path / str(m))
        assert (out / "model.safetensors").read_bytes() == (plain / "models" / str(m) / "model.safetensors").read_bytes()
    _, _, out = exporter.aggregate(tmp_path / "aggregate")
    assert (out / "model.safetensors").read_bytes() == (budget / "final" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*map(str, evicted), "aggregate"])


def test_the_budget_may_change_on_resume_and_older_configs_resume(runs):
    frozen = runs["budget"] / "config.yaml"
    old = yaml.safe_load(frozen.read_text())
    del old["runtime"]["model_store_bytes"], old["runtime"]["model_store_depth"]
    frozen.write_text(yaml.safe_dump(old, sort_keys=False))
    assert run(runs["budget_config"])[0] == "done"
    given = yaml.safe_load(runs["budget_config"].read_text())
    with pytest.raises(ConfigError, match=r"runtime.model_store_bytes: expected a size such as '5GB'"):
        config_mod.from_dict({**given, "runtime": {"run_dir": "x", "model_store_bytes": "lots"}})
    with pytest.raises(ConfigError, match=r"runtime.model_store_depth: expected an integer >= 1, got 0"):
        config_mod.from_dict({**given, "runtime": {"run_dir": "x", "model_store_depth": 0}})


def stopped_run(family, tmp_path, name="run"):
    path = config_file(family, tmp_path, name)
    assert run(path, stop_after=5)[0] == "stopped"
    return path, tmp_path / name


def deepest_member(run_dir):
    """The member with the most dead ancestors (its rebuild goes through them)."""
    state = read_state(run_dir / "state.h5")
    parents = list(zip(state["models"]["parent1"], state["models"]["parent2"]))
    kinds, on_disk = state["models"]["kind"], set(child_dirs(run_dir))

    def dead(m):
        return sum(1 + dead(p) for p in parents[m] if kinds[p] == "child" and p not in on_disk)
    return max(members(run_dir), key=lambda m: (dead(m), m))


def test_a_deleted_member_is_rebuilt_at_resume_and_the_run_ends_as_an_uninterrupted_one(runs, tiny_family, tmp_path):
    path, run_dir = stopped_run(tiny_family, tmp_path)
    victim = deepest_member(run_dir)
    shutil.rmtree(run_dir / "models" / str(victim))
    status, lines = run(path)
    assert status == "done"
    assert f"rebuilt child #{victim} from its recipe (its weights were missing)" in lines
    assert_same_results(runs["plain"], run_dir)
    for m in child_dirs(run_dir):
        assert (run_dir / "models" / str(m) / "model.safetensors").read_bytes() == (
            runs["plain"] / "models" / str(m) / "model.safetensors").read_bytes()


def test_a_member_that_cannot_be_rebuilt_is_refused_then_dropped_with_the_flag(tiny_family, tmp_path, caplog):
    family = {"base": tiny_family["base"],
              "experts": {n: shutil.copytree(p, tmp_path / f"expert-{n}") for n, p in tiny_family["experts"].items()}}
    path, run_dir = stopped_run(family, tmp_path)
    pending = read_state(run_dir / "state.h5")["pending"]
    victim = max({int(pending["parent1"][0]), int(pending["parent2"][0])} & set(members(run_dir)))
    shutil.rmtree(run_dir / "models" / str(victim))
    for expert in family["experts"].values():
        shutil.copyfile(tiny_family["base"] / "model.safetensors", expert / "model.safetensors")

    def recorded():
        """The state but the experts' digests, which --force records anew (run/integrity.py)."""
        tree = read_state(run_dir / "state.h5")
        tree["attrs"].pop("inputs")
        return tree

    before = recorded()
    with pytest.raises(LostModels, match=rf"(?s)models .*#{victim} \(archive member\).* cannot be rebuilt.*--drop-lost"):
        run(path, force=True)
    assert_trees_equal(recorded(), before)
    with caplog.at_level(logging.WARNING, logger="cqd_mpi.run.store"):
        status, lines = run(path, drop_lost=True)
    assert status == "done"
    assert any(f"#{victim}" in line and "--drop-lost" in line for line in lines)
    assert f"dropped models #{victim}" in caplog.text
    assert victim not in members(run_dir)
    resampled = read_state(run_dir / "state.h5")["models"]
    first = int(pending["model_id"][0])
    assert victim not in {*resampled["parent1"][first:], *resampled["parent2"][first:]}
    state = RunState.load(run_dir)
    assert victim in [m for _, m in state.core.dropped]
    *_, (_, replayed) = state.replay()
    assert [a.occupant.tolist() for a in replayed] == [a.occupant.tolist() for a in state.stored_archives()]


def test_no_needed_model_is_more_than_the_bound_of_merges_from_disk(runs, tmp_path):
    from cqd_mpi.run.rundir import RunDir
    from cqd_mpi.run.store import ModelStore

    state = RunState.load(runs["budget"])
    needed, depth = ModelStore(core=state.core, rundir=RunDir(runs["budget"])).needed()
    assert needed >= set(members(runs["budget"]))
    assert 0 < max(depth.values()) <= config_mod.RuntimeConfig.model_store_depth
    run_dir = shutil.copytree(runs["plain"], tmp_path / "run")
    for bound in (1, 2, 3):
        store = ModelStore(core=RunState.load(run_dir).core, rundir=RunDir(run_dir), budget=1, max_depth=bound)
        assert store.settle()
        assert max(store.needed()[1].values()) == bound


def test_a_rebuild_that_differs_from_its_digest_stops_and_is_named_at_the_next_resume(runs, tiny_family, tmp_path):
    from cqd_mpi.run.rundir import RunDir
    from cqd_mpi.run.store import ModelStore

    run_dir = shutil.copytree(runs["budget"], tmp_path / "run")
    core = RunState.load(run_dir).core
    for e in core.expert_ids:
        changed = shutil.copytree(core.models[e].source, tmp_path / f"expert-{e}")
        shutil.copyfile(tiny_family["base"] / "model.safetensors", changed / "model.safetensors")
        core.models[e].source = str(changed)

    def store():
        return ModelStore(core=core, rundir=RunDir(run_dir), budget=1,
                          mutation=config_mod.load(runs["budget_config"]).qd.mutation)

    evicted = sorted(set(members(run_dir)) - set(child_dirs(run_dir)))
    with pytest.raises(LostModels, match=r"rebuilt from its recipe differs from the model the run saved"):
        store().path(evicted[0])
    with pytest.raises(LostModels, match=rf"models .*#{evicted[0]} \(archive member\)"):
        store().check()


def test_unreadable_expert_weights_are_named_before_anything_runs(runs, tmp_path):
    from cqd_mpi.errors import StateError
    from cqd_mpi.run.rundir import RunDir
    from cqd_mpi.run.store import ModelStore

    core = RunState.load(runs["budget"]).core
    broken = shutil.copytree(core.models[2].source, tmp_path / "expert", ignore=shutil.ignore_patterns("*.safetensors"))
    core.models[2].source = str(broken)
    with pytest.raises(StateError, match=rf"(?s)base and experts.*#2 \(expert\): {broken} has neither model.safetensors"):
        ModelStore(core=core, rundir=RunDir(runs["budget"])).check()
