"""`python -m cqd_mpi export RUN_DIR ...`: what it writes and prints, and its errors."""

import pytest
import torch

from cqd_mpi.analysis.export import Exporter
from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.cli import main
from cqd_mpi.merging.weights import ModelDir
from tests.analysis.runs import finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_family):
    return finished_run(tmp_path_factory, tiny_family, 3)


def same_tensors(a, b) -> bool:
    a, b = dict(ModelDir(a).tensors()), dict(ModelDir(b).tensors())
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_export_the_aggregate(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--aggregate", str(tmp_path / "agg")]) == 0
    out = capsys.readouterr().out
    assert same_tensors(tmp_path / "agg", run_dir / "final")
    assert out.count(" beta ") == 3 and f"wrote {tmp_path / 'agg'}" in out
    assert main(["export", str(run_dir), "--aggregate", str(tmp_path / "agg"), "--weights", "1", "0", "0"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--aggregate", str(tmp_path / "agg"), "--force",
                 "--weights", "1", "0", "0", "--max-shard-size", "20KB"]) == 0
    assert "beta 1\n" in capsys.readouterr().out
    assert (tmp_path / "agg" / "model.safetensors.index.json").exists()
    exporter = Exporter(RunState.load(run_dir))
    assert same_tensors(tmp_path / "agg", exporter.stored_path(exporter.elite_id("alpha")))


def test_export_a_model_and_an_elite(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--model", "2", str(tmp_path / "m")]) == 0
    assert "expert beta (#2): copied" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--elite", "gamma", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("elite of gamma: ")


@pytest.mark.parametrize("args, message", [
    (["--elite", "zeta", "OUT"], "unknown task 'zeta': the run at"),
    (["--model", "99", "OUT"], "unknown model id 99: the run at"),
    (["--model", "two", "OUT"], "--model: expected an integer model id, got 'two'"),
    (["--aggregate", "OUT", "--weights", "0.5", "0.5"], "--weights: expected one beta per task (3: alpha, beta, gamma), got 2"),
    (["--aggregate", "OUT", "--temperature", "0"], "--temperature: expected a number > 0, got 0.0"),
    (["--model", "1", "OUT", "--temperature", "2"], "--temperature applies to --aggregate only"),
])
def test_bad_inputs_give_clear_errors(run_dir, tmp_path, capsys, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(["export", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_such_run_dir(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--aggregate", str(tmp_path / "out")]) == 2
    assert f"run dir {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_output_inside_the_run_is_refused(run_dir, capsys):
    assert main(["export", str(run_dir), "--model", "1", str(run_dir / "models" / "x")]) == 2
    assert "is part of the run or one of its source models" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_export_a_ties_or_dare_baseline_of_the_runs_experts(run_dir, tiny_family, tmp_path, capsys, method):
    from cqd_mpi.merging.sparse import SparseMerge, sparse_merge_stream

    code = main(["export", str(run_dir), "--baseline", method, str(tmp_path / method), "--density", "0.3",
                 "--seed", "2", "--weights", "1", "0.5", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{method} of the experts alpha, beta, gamma: density 0.3, scale 1.0, weights 1 0.5 0.5" in out
    spec = SparseMerge(method=method, density=0.3, seed=2, weights=(1.0, 0.5, 0.5))
    expected = sparse_merge_stream(base=ModelDir(tiny_family["base"]),
                                   members=[ModelDir(p) for p in tiny_family["experts"].values()], spec=spec)
    written = dict(ModelDir(tmp_path / method).tensors())
    assert all(torch.equal(written[name], tensor) for name, tensor in expected)


def test_export_baseline_user_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--baseline", "median", str(tmp_path / "x")]) == 2
    assert "--baseline: expected one of ties, dare, dare-ties, got 'median'" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--baseline", "ties", str(tmp_path / "x"), "--weights", "1", "2"]) == 2
    assert "--weights: expected one weight per member model (3), got 2" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--model", "0", str(tmp_path / "y"), "--weights", "1", "2", "3"]) == 2
    assert "--weights applies to --aggregate and --baseline only" in capsys.readouterr().err
