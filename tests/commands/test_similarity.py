"""`python -m cqd_mpi similarity A B --base BASE`."""

from __future__ import annotations

import pytest

from cqd_mpi.cli import main
from cqd_mpi.merging.operators import model_similarity
from cqd_mpi.merging.weights import ModelDir


def test_prints_the_metric(bf16, capsys):
    assert (
        main(["similarity", str(bf16["p1"]), str(bf16["p2"]), "--base", str(bf16["base"])])
        == 0
    )
    printed = float(capsys.readouterr().out)
    expected = model_similarity(
        base=ModelDir(bf16["base"]), a=ModelDir(bf16["p1"]), b=ModelDir(bf16["p2"])
    )
    assert printed == pytest.approx(expected, abs=5e-7)
    assert 0.5 < printed < 1.0


def test_exclude_changes_which_matrices_count(bf16, capsys):
    main(
        [
            "similarity",
            str(bf16["p1"]),
            str(bf16["base"]),
            "--base",
            str(bf16["base"]),
            "--exclude",
            "self_attn",
            "mlp",
            "lm_head",
        ]
    )
    assert float(capsys.readouterr().out) == 0.0
    main(["similarity", str(bf16["p1"]), str(bf16["p1"]), "--base", str(bf16["base"])])
    assert float(capsys.readouterr().out) == 1.0


def test_errors_name_the_problem(bf16, tmp_path, capsys):
    assert (
        main(["similarity", str(bf16["p1"]), str(tmp_path), "--base", str(bf16["base"])]) == 2
    )
    assert f"{tmp_path} has neither model.safetensors" in capsys.readouterr().err
    assert (
        main(
            [
                "similarity",
                str(bf16["p1"]),
                str(bf16["p2"]),
                "--base",
                str(bf16["base"]),
                "--exclude",
                ".",
            ]
        )
        == 2
    )
    assert "has no 2-D floating-point matrices to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["similarity", str(bf16["p1"]), str(bf16["p2"])])
