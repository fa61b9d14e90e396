"""Every search method on the real runtime: a whole run, the rows `analyze` and `export` read,
and a kill -9 resumed to the same state as an uninterrupted run. Policy gradient runs under
`mpiexec -n 3` with two eval groups (a population scored in parallel) and `runtime.test_every`,
so the same run checks the budget curve's points, their resume and `compare`."""

import signal

import numpy as np
import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

METHODS = {
    "qd": {"generations": 4},
    "cma-es": {"generations": 5, "coefficients": {"population": 3, "sigma0": 0.3}},
    "nsga2": {"generations": 5, "coefficients": {"population": 3}},
    "policy-gradient": {"generations": 6, "coefficients": {"population": 3, "sigma0": 0.3},
                        "policy_gradient": {"learning_rate": 0.1}},
}
MPI_RANKS = {"policy-gradient": 3}
RUNTIME = {"policy-gradient": {"eval_groups": 2, "test_every": 2}}
"""Policy gradient's run: three ranks, two eval groups, a budget-curve point every 2 models."""


def method_config(family, root, method):
    config = small_config(family, root / "run")
    config["qd"].update(method=method, **METHODS[method])
    config["runtime"].update(RUNTIME.get(method, {}))
    return write_config(root / "config.yaml", config)


def run_method(method, config, **kwargs):
    return run_cli("run", config, mpi_ranks=MPI_RANKS.get(method), timeout=240, **kwargs)


@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.extra("baselines")) if m in ("cma-es", "nsga2")
                                        else m for m in METHODS])
def finished(request, tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    config = method_config(tiny_family, root, request.param)
    result = run_method(request.param, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"method": request.param, "root": root, "config": config, "stdout": result.stdout}


def test_a_run_writes_the_method_and_its_final_model(finished):
    state = read_state(finished["root"] / "run" / "state.h5")
    method = finished["method"]
    assert state["attrs"]["method"] == method and state["attrs"]["phase"] == "done"
    kinds = state["models"]["kind"]
    searched = [i for i, k in enumerate(kinds) if k == ("child" if method == "qd" else "combination")]
    assert state["attrs"]["world_size"] == MPI_RANKS.get(method, 1)
    assert len(searched) == METHODS[method]["generations"] == len(state["history"]["generation"])
    final = kinds.index("aggregate")
    assert np.all(np.isfinite(state["models"]["test_scores"][[0, 1, 2, 3, kinds.index("average"), final]]))
    assert (finished["root"] / "run" / "final" / "model.safetensors").is_file()
    if method != "qd":
        coefficients = state["models"]["coefficients"]
        best = max(searched, key=lambda i: (state["models"]["scores"][i].mean(), -i))
        np.testing.assert_array_equal(coefficients[final], coefficients[best])
        assert not any((finished["root"] / "run" / "models").iterdir())
    label = {"qd": "QD aggregate", "cma-es": "CMA-ES best", "nsga2": "NSGA-II front's best",
             "policy-gradient": "Policy gradient best"}[method]
    assert label in finished["stdout"] and "naive average" in finished["stdout"]


def test_analyze_and_export_read_the_run(finished, tmp_path):
    run_dir = finished["root"] / "run"
    analyzed = run_cli("analyze", run_dir, "--out", tmp_path / "plots")
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    assert (tmp_path / "plots" / "elite_maps.png").is_file() and "Archives at generation" in analyzed.stdout
    state = read_state(run_dir / "state.h5")
    kinds = state["models"]["kind"]
    searched = kinds.index("child" if finished["method"] == "qd" else "combination")
    exported = run_cli("export", run_dir, "--model", searched, tmp_path / "model")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert ("copied" if state["models"]["saved"][searched] else "rebuilt from its recipe") in exported.stdout
    aggregate = run_cli("export", run_dir, "--aggregate", tmp_path / "aggregate")
    if finished["method"] == "qd":
        assert aggregate.returncode == 0, aggregate.stderr[-2000:]
        assert (tmp_path / "aggregate" / "model.safetensors").read_bytes() == (
            run_dir / "final" / "model.safetensors").read_bytes()
    else:
        assert aggregate.returncode == 2 and f"this is a {finished['method']} run, whose final model is" in aggregate.stderr


def test_the_budget_curve_scores_the_would_be_final_model_every_n_models(finished, tmp_path):
    """Without test_every no curve is written; with it, a point at 2 and 4 models evaluated (the
    final model is the point at the budget, 6), each the best candidate so far on the test split,
    and `compare` shows the method's row and draws the curve (compare's other methods:
    tests/commands/test_compare.py)."""
    state = read_state(finished["root"] / "run" / "state.h5")
    every = RUNTIME.get(finished["method"], {}).get("test_every", 0)
    if not every:
        assert "curve" not in state and "curve" not in state["models"]["kind"]
        return
    models, curve = state["models"], state["curve"]
    np.testing.assert_array_equal(curve["models_evaluated"], [2, 4])
    points = [i for i, k in enumerate(models["kind"]) if k == "curve"]
    np.testing.assert_array_equal(curve["test_scores"], models["test_scores"][points])
    assert np.all(np.isnan(models["scores"][points])) and not any(models["saved"][points])
    searched = [i for i, k in enumerate(models["kind"]) if k == "combination"]
    assert len(searched) == METHODS[finished["method"]]["generations"]
    for point, n in zip(points, [2, 4]):
        best = max(searched[:n], key=lambda i: (models["scores"][i].mean(), -i))
        np.testing.assert_array_equal(models["coefficients"][point], models["coefficients"][best])
    compared = run_cli("compare", finished["root"] / "run", "--format", "csv", "--no-chart",
                       "--budget-curve", tmp_path / "curve.png")
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert any(line.startswith("Policy gradient,method,") for line in compared.stdout.splitlines()), compared.stdout
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_kill_9_then_resume_equals_the_uninterrupted_run(finished, tiny_family, tmp_path):
    method = finished["method"]
    config = method_config(tiny_family, tmp_path, method)
    fault = "merge@0:kill:6" if method in MPI_RANKS else "eval:kill:7"
    killed = run_method(method, config, env=subprocess_env(CQD_MPI_FAULT=fault))
    assert killed.returncode != 0 if method in MPI_RANKS else killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] != "done"
    resumed = run_method(method, config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(finished["root"] / "run", tmp_path / "run")

