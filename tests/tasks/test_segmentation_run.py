"""CycleQD over SAM experts with two segmentation tasks (Kvasir-SEG and ISIC 2017 layouts)
under mpiexec: the same state with one worker (-n 2) and two (-n 3), and after kill -9 and resume."""

import pytest

from cqd_mpi.run.state import read_state
from tests.conftest import subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli
from tests.tasks.segmentation_data import ISIC_SETTINGS, isic, kvasir
from tests.tiny_sam import family

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam-run")
    return {"family": family(root / "models"), "polyp": kvasir(root / "Kvasir-SEG", n=8),
            "skin": isic(root / "ISIC2017", n=8)}


def sam_config(setup, run_dir):
    models = setup["family"]
    return {
        "base": str(models["base"]),
        "experts": [{"task": name, "path": str(path)} for name, path in models["experts"].items()],
        "tasks": [
            {"name": "polyp", "kind": "segmentation", "data": str(setup["polyp"]),
             "settings": {"prompt": "box", "box_jitter": 0.1, "metric": "iou"}, "batch_size": 3},
            {"name": "skin", "kind": "segmentation", "data": str(setup["skin"]),
             "settings": {**ISIC_SETTINGS, "prompt": "point", "metric": "dice"}, "batch_size": 3},
        ],
        "qd": {"generations": 4, "n_bins": 4, "mutation": {"kind": "svd", "rank": 4, "w_max": 0.3}},
        "runtime": {"run_dir": str(run_dir), "seed": 2, "threads": 1},
        "engine": {"kind": "sam", "device": "cpu", "settings": {"batch_size": 4}},
    }


@pytest.fixture(scope="module")
def one_worker(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-worker")
    result = run_cli("run", write_config(root / "config.yaml", sam_config(setup, root / "run")), mpi_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_a_sam_run_scores_both_tasks_and_saves_loadable_children(one_worker):
    state = read_state(one_worker / "state.h5")
    assert state["attrs"]["phase"] == "done" and list(state["attrs"]["task_names"]) == ["polyp", "skin"]
    import numpy as np

    scores = state["models"]["scores"]
    scores = scores[np.isfinite(scores).all(axis=1)]
    assert scores.shape == (7, 2) and ((scores >= 0) & (scores <= 1)).all()
    assert len({tuple(row) for row in scores.tolist()}) > 2
    from transformers import SamModel

    final = one_worker / "final"
    assert (final / "preprocessor_config.json").is_file()
    SamModel.from_pretrained(final)


def test_same_state_with_one_and_two_workers(one_worker, setup, tmp_path):
    config = write_config(tmp_path / "config.yaml", sam_config(setup, tmp_path / "run"))
    result = run_cli("run", config, mpi_ranks=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_results(one_worker, tmp_path / "run")


def test_kill_9_under_mpiexec_then_resume_equals_the_uninterrupted_run(one_worker, setup, tmp_path):
    config = write_config(tmp_path / "config.yaml", sam_config(setup, tmp_path / "run"))
    killed = run_cli("run", config, mpi_ranks=3, env=subprocess_env(CQD_MPI_FAULT="eval@2:kill:5"), timeout=180)
    assert killed.returncode != 0
    assert read_state(tmp_path / "run" / "state.h5")["attrs"]["phase"] != "done"
    resumed = run_cli("run", config, mpi_ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert_same_results(one_worker, tmp_path / "run")
