"""`python -m cqd_mpi doctor`: what a job will use, including whether this CPU has bf16 dot products."""

from types import SimpleNamespace

import pytest

from cqd_mpi import cpu
from cqd_mpi.commands import doctor
from tests.conftest import probe_config, write_config
from tests.runtime.helpers import run_cli


def test_doctor_names_each_rank_and_its_cpu_bf16_support():
    result = run_cli("doctor", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "== software" in result.stdout and "== ranks" in result.stdout
    assert "rank   0 on " in result.stdout
    assert f"CPU bf16 dot products: {cpu.describe_bf16()})" in result.stdout


@pytest.mark.parametrize(("native", "mark"), [("no", "[WARN]"), ("yes", "[ok]"), ("unknown", "[ok]")])
def test_doctor_checks_a_bf16_sketch_against_this_cpu(tiny_family, tmp_path, monkeypatch, capsys,
                                                      native, mark):
    monkeypatch.setattr(cpu, "describe_bf16", lambda: native)
    config = probe_config(tiny_family, tmp_path / "run")
    config["qd"]["mutation"]["sketch_dtype"] = "bfloat16"
    assert doctor.run(SimpleNamespace(config=str(write_config(tmp_path / "c.yaml", config)))) == 0
    out = capsys.readouterr().out
    assert f"  {mark} qd.mutation.sketch_dtype: bfloat16, this node's CPU bf16 dot products: {native}" in out
    assert "base and 3 experts: compatible" in out


def test_doctor_says_nothing_about_a_float32_sketch(tiny_family, tmp_path, capsys):
    config = probe_config(tiny_family, tmp_path / "run")
    assert doctor.run(SimpleNamespace(config=str(write_config(tmp_path / "c.yaml", config)))) == 0
    out = capsys.readouterr().out
    assert "== merging" not in out and "sketch_dtype" not in out
    assert "base and 3 experts: compatible" in out
