"""`python -m cqd_mpi similarity A B --base BASE`."""

from __future__ import annotations

import pytest
import torch

from cqd_mpi.cli import main
from cqd_mpi.operators import model_similarity
from cqd_mpi.weights import ModelDir
from tests.tiny_llama import family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("similarity-cli"), torch.bfloat16)


def test_prints_the_metric(models, capsys):
    assert (
        main(["similarity", str(models["p1"]), str(models["p2"]), "--base", str(models["base"])])
        == 0
    )
    printed = float(capsys.readouterr().out)
    expected = model_similarity(
        base=ModelDir(models["base"]), a=ModelDir(models["p1"]), b=ModelDir(models["p2"])
    )
    assert printed == pytest.approx(expected, abs=5e-7)
    assert 0.5 < printed < 1.0


def test_exclude_changes_which_matrices_count(models, capsys):
    main(
        [
            "similarity",
            str(models["p1"]),
            str(models["base"]),
            "--base",
            str(models["base"]),
            "--exclude",
            "self_attn",
            "mlp",
            "lm_head",
        ]
    )
    assert float(capsys.readouterr().out) == 0.0
    main(["similarity", str(models["p1"]), str(models["p1"]), "--base", str(models["base"])])
    assert float(capsys.readouterr().out) == 1.0


def test_errors_name_the_problem(models, tmp_path, capsys):
    assert (
        main(["similarity", str(models["p1"]), str(tmp_path), "--base", str(models["base"])]) == 2
    )
    assert f"{tmp_path} has neither model.safetensors" in capsys.readouterr().err
    assert (
        main(
            [
                "similarity",
                str(models["p1"]),
                str(models["p2"]),
                "--base",
                str(models["base"]),
                "--exclude",
                ".",
            ]
        )
        == 2
    )
    assert "has no 2-D floating-point matrices to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["similarity", str(models["p1"]), str(models["p2"])])
