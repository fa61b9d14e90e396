"""Every search method on the real runtime: a whole run, the rows `analyze` and `export` read,
and a kill -9 resumed to the same state as an uninterrupted run."""

import signal

import numpy as np
import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli

METHODS = {
    "qd": {"generations": 4},
    "cma-es": {"generations": 5, "coefficients": {"population": 3, "sigma0": 0.3}},
    "nsga2": {"generations": 5, "coefficients": {"population": 3}},
}


def method_config(family, root, method):
    config = small_config(family, root / "run")
    config["qd"].update(method=method, **METHODS[method])
    return write_config(root / "config.yaml", config)


@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.extra("baselines")) if m in ("cma-es", "nsga2")
                                        else m for m in METHODS])
def finished(request, tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    config = method_config(tiny_family, root, request.param)
    result = run_cli("run", config)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"method": request.param, "root": root, "config": config, "stdout": result.stdout}


def test_a_run_writes_the_method_and_its_final_model(finished):
    state = read_state(finished["root"] / "run" / "state.h5")
    method = finished["method"]
    assert state["attrs"]["method"] == method and state["attrs"]["phase"] == "done"
    kinds = state["models"]["kind"]
    searched = [i for i, k in enumerate(kinds) if k == ("child" if method == "qd" else "combination")]
    assert len(searched) == METHODS[method]["generations"] == len(state["history"]["generation"])
    final = kinds.index("aggregate")
    assert np.all(np.isfinite(state["models"]["test_scores"][[0, 1, 2, 3, kinds.index("average"), final]]))
    assert (finished["root"] / "run" / "final" / "model.safetensors").is_file()
    if method != "qd":
        coefficients = state["models"]["coefficients"]
        best = max(searched, key=lambda i: (state["models"]["scores"][i].mean(), -i))
        np.testing.assert_array_equal(coefficients[final], coefficients[best])
        assert not any((finished["root"] / "run" / "models").iterdir())
    label = {"qd": "QD aggregate", "cma-es": "CMA-ES best", "nsga2": "NSGA-II front's best"}[method]
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


def test_kill_9_then_resume_equals_the_uninterrupted_run(finished, tiny_family, tmp_path):
    config = method_config(tiny_family, tmp_path, finished["method"])
    killed = run_cli("run", config, env=subprocess_env(CQD_MPI_FAULT="eval:kill:7"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] != "done"
    resumed = run_cli("run", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(finished["root"] / "run", tmp_path / "run")

