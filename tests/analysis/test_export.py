"""Exports from a run: the aggregate (the run's own, or other betas), stored and rebuilt models."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cqd_mpi.analysis.export import Exporter, check_output
from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.errors import ConfigError, StateError
from cqd_mpi.merging.weights import ModelDir
from cqd_mpi.qd.records import Split
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.evaluation import combine, make_chunks
from cqd_mpi.runtime.worker import Worker, build_tasks
from tests.analysis.runs import finished_run

TOKENS = torch.tensor([[1, 5, 9, 12, 3, 40, 7]])


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tiny_family):
    return RunState.load(finished_run(tmp_path_factory, tiny_family, 3))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_family):
    return [RunState.load(finished_run(tmp_path_factory, tiny_family, k)) for k in (2, 3, 4)]


def tensors(path):
    return dict(ModelDir(path).tensors())


def assert_same_tensors(a, b):
    a, b = tensors(a), tensors(b)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def logits(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_default_aggregate_reproduces_the_final_model_byte_for_byte(run3, tmp_path):
    members, betas, out = Exporter(run3).aggregate(tmp_path / "agg")
    final = run3.rundir.final_dir
    assert_same_tensors(out, final)
    assert (out / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    report = json.loads((final / "report.json").read_text())
    assert betas == report["aggregate_betas"]
    assert members == [report["elites"][name]["id"] for name in run3.task_names]


def test_explicit_betas_give_base_plus_weighted_task_vectors(run3, tmp_path):
    weights = [0.5, -0.25, 1.5]
    members, betas, out = Exporter(run3).aggregate(tmp_path / "agg", weights=weights)
    assert betas == weights
    base = tensors(run3.rundir.weights_of(run3.models[0]))
    member_tensors = [tensors(Exporter(run3).stored_path(m)) for m in members]
    got = tensors(out)
    for name, theta in base.items():
        expected = theta.float() + sum(b * (m[name].float() - theta.float()) for b, m in zip(weights, member_tensors))
        torch.testing.assert_close(got[name].float(), expected, rtol=1e-6, atol=1e-6)


def test_temperature_changes_beta_and_matches_the_same_explicit_weights(run3, tmp_path):
    exporter = Exporter(run3)
    _, flat = exporter.aggregate_members(temperature=1e6)
    np.testing.assert_allclose(flat, [1 / 3] * 3, rtol=1e-5)
    _, sharp = exporter.aggregate_members(temperature=0.01)
    qualities = [run3.scores[e][k] for k, e in enumerate(exporter.aggregate_members()[0])]
    assert int(np.argmax(sharp)) == int(np.argmax(qualities))
    _, _, hot = exporter.aggregate(tmp_path / "hot", temperature=1e6)
    _, _, same = exporter.aggregate(tmp_path / "same", weights=flat)
    assert_same_tensors(hot, same)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--temperature: expected a number > 0"):
            exporter.aggregate_members(temperature=bad)
    with pytest.raises(ConfigError, match=r"--weights: expected one beta per task \(3: alpha, beta, gamma\), got 2"):
        exporter.aggregate_members(weights=[0.5, 0.5])


def test_stored_child_export_loads_and_gives_the_stored_logits(run3, tmp_path):
    exporter = Exporter(run3)
    child = next(m for m, kind in enumerate(run3.kinds) if kind == "child" and exporter.stored_path(m))
    out = exporter.model(child, tmp_path / "child")
    assert_same_tensors(out, exporter.stored_path(child))
    torch.testing.assert_close(logits(out), logits(exporter.stored_path(child)), rtol=0, atol=0)


def test_elite_export_is_the_archive_elite(run3, tmp_path):
    exporter = Exporter(run3)
    for q, name in enumerate(run3.task_names):
        elite, out = exporter.elite(name, tmp_path / name)
        assert elite == run3.stored_archives()[q].elite()
        assert_same_tensors(out, exporter.stored_path(elite))
    with pytest.raises(StateError, match=r"unknown task 'zeta': the run at .* has tasks alpha, beta, gamma"):
        exporter.elite("zeta", tmp_path / "zeta")


def test_recipes_rebuild_every_stored_model_exactly(run3, tmp_path):
    exporter = Exporter(run3)
    rebuildable = [m for m, kind in enumerate(run3.kinds) if kind in ("child", "aggregate") and exporter.stored_path(m)]
    assert len(rebuildable) >= 3
    for m in rebuildable:
        assert_same_tensors(exporter.model(m, tmp_path / str(m), rebuild=True), exporter.stored_path(m))
    with pytest.raises(StateError, match=r"expert alpha \(#1\) has no recipe"):
        exporter.model(1, tmp_path / "e", rebuild=True)


def test_an_unsaved_child_is_rebuilt_and_scores_what_the_run_measured(run3, tmp_path):
    exporter = Exporter(run3)
    child = next((m for m, kind in enumerate(run3.kinds)
                  if kind == "child" and exporter.stored_path(m) is None
                  and all(exporter.stored_path(p) for p in run3.parents(m))), None)
    assert child is not None, "the K = 3 run has no unsaved child with both parents saved"
    out = exporter.model(child, tmp_path / "child")
    AutoModelForCausalLM.from_pretrained(out)
    config = config_mod.load(run3.rundir.config_path)
    worker = Worker(config, tasks=build_tasks(config, work_root=tmp_path / "work"))
    worker.load_dir(out)
    stored = run3.tree["tasks"]
    splits = {n: Split(tuple(stored[n]["search_ids"]), tuple(stored[n]["test_ids"])) for n in run3.task_names}
    chunks = make_chunks(splits, "search", {n: t.batch_size for n, t in worker.tasks.items()})
    scores = combine(worker.tasks, run3.task_names, chunks, worker.evaluate(chunks))
    np.testing.assert_array_equal(scores.metrics, run3.scores[child])
    for name in run3.task_names:
        np.testing.assert_array_equal(scores.item_scores[name], run3.tree["items"][name]["search"][child])


def test_a_child_whose_parents_are_gone_is_rebuilt_through_its_ancestors(runs, tmp_path):
    cases = [(run, m) for run in runs for m, kind in enumerate(run.kinds)
             if kind == "child" and not run.kept[m]
             and not all(run.kept[p] for p in run.parents(m))]
    assert cases, "no run has an unsaved child with an unsaved parent"
    run, child = cases[0]
    first = Exporter(run).model(child, tmp_path / "child")
    again = Exporter(run).model(child, tmp_path / "again")
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "child"]


def test_naive_average_base_and_aggregate_by_id(run3, tmp_path):
    exporter = Exporter(run3)
    average = run3.kinds.index("average")
    out = exporter.model(average, tmp_path / "average")
    experts = [tensors(exporter.stored_path(e)) for e in run3.expert_ids]
    for name, value in tensors(out).items():
        torch.testing.assert_close(value.float(), sum(e[name].float() for e in experts) / 3, rtol=1e-6, atol=1e-6)
    assert_same_tensors(exporter.model(0, tmp_path / "base"), exporter.stored_path(0))
    assert_same_tensors(exporter.model(run3.kinds.index("aggregate"), tmp_path / "agg"), run3.rundir.final_dir)
    with pytest.raises(StateError, match=r"unknown model id 99: the run at .* has models 0..\d+"):
        exporter.model(99, tmp_path / "x")


def test_outputs_inside_the_run_or_existing_ones_are_refused(run3, tmp_path):
    for inside in (run3.path, run3.rundir.final_dir, run3.rundir.models_dir / "new",
                   run3.rundir.weights_of(run3.models[1])):
        with pytest.raises(ConfigError, match="is part of the run or one of its source models"):
            check_output(inside, run3, force=True)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists; choose a new directory or pass --force"):
        check_output(existing, run3, force=False)
    with pytest.raises(ConfigError, match="not a model dir; --force replaces only model dirs"):
        check_output(existing, run3, force=True)
    model = Exporter(run3).model(0, tmp_path / "model")
    assert check_output(model, run3, force=True) == model.resolve()
