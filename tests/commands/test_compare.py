"""`python -m cqd_mpi compare`: Tables 1 and 2 over real state files of finished runs."""

import json

import numpy as np
import pytest
import yaml

from cqd_mpi.cli import main
from cqd_mpi.qd.coefficients import CMAES
from cqd_mpi.qd.noncyclic import NonCyclicQD
from cqd_mpi.run.state import HDF5Backend
from tests.qd.test_cycleqd import make_core
from tests.qd.test_methods import run_all

TRIALS = {
    "cycleqd-svd-elite": (None, "svd", "elite"),
    "cycleqd-none-random": (None, "none", "random"),
    "qd-none-random": (NonCyclicQD, "none", "random"),
    "cma-es": (CMAES, "none", "elite"),
}


def finished_run(root, name, seed, *, generations=6, stop_after=None):
    cls, mutation, sampling = TRIALS[name]
    options = dict(generations=generations, seed=seed, sampling=sampling)
    if cls is CMAES:
        options["population"] = 3
    core = make_core(**options) if cls is None else make_core(cls, **options)
    if stop_after is None:
        run_all(core)
    else:
        for _ in range(stop_after):
            job = core.ask()
            core.tell(job.model_id, np.random.default_rng(job.model_id).random(3))
    path = root / f"{name}-{seed}"
    path.mkdir()
    config = yaml.safe_dump({"qd": {"mutation": {"kind": mutation}}, "runtime": {"seed": seed}})
    HDF5Backend(path / "state.h5").save(core, attrs={"config": config})
    return path, core


def compare(capsys, *args):
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return [finished_run(root, name, seed) for name in TRIALS for seed in (0, 1)]


def test_json_table_has_every_group_with_mean_and_std_over_seeds(runs, tmp_path, capsys):
    code, out, err = compare(capsys, *(p for p, _ in runs), "--format", "json", "--chart", tmp_path / "c.png")
    assert code == 0, err
    report = json.loads(out)
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["base", "expert code", "expert os", "expert db", "naive average",
                          "CycleQD + SVD mutation + elite sampling", "CycleQD + no mutation + random sampling",
                          "QD + no mutation + random sampling", "CMA-ES"]
    cores = {(name, seed): core for (path, core), (name, seed) in
             zip(runs, [(n, s) for n in TRIALS for s in (0, 1)])}
    for name, label in (("cycleqd-svd-elite", "CycleQD + SVD mutation + elite sampling"), ("cma-es", "CMA-ES")):
        finals = np.stack([[r for r in cores[name, s].models if r.kind == "aggregate"][-1].test_scores
                           for s in (0, 1)])
        row = rows[label]
        assert row["seeds"] == [0, 1] and row["budget"] == 6
        np.testing.assert_allclose([row["mean"][t] for t in ("code", "os", "db")], finals.mean(axis=0))
        np.testing.assert_allclose(row["mean"]["avg"], finals.mean(axis=1).mean())
        np.testing.assert_allclose(row["std"]["avg"], finals.mean(axis=1).std(ddof=1))
    base = np.stack([cores["cycleqd-svd-elite", s].models[0].test_scores for s in (0, 1)])
    np.testing.assert_allclose([rows["base"]["mean"][t] for t in ("code", "os", "db")], base.mean(axis=0))
    assert report["note"] is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_and_csv(runs, tmp_path, capsys):
    code, out, _ = compare(capsys, *(p for p, _ in runs), "--chart", tmp_path / "c.png")
    assert code == 0
    assert "| # | model | code | os | db | Avg | seeds | budget |" in out
    assert "| 8 | CMA-ES |" in out and " ± " in out and f"wrote {tmp_path / 'c.png'}" in out
    code, out, _ = compare(capsys, *(p for p, _ in runs[:2]), "--format", "csv", "--no-chart")
    lines = out.strip().splitlines()
    assert lines[0].startswith("model,kind,seeds,budget,code_mean,os_mean,db_mean,avg_mean,code_std")
    assert len(lines) == 1 + 5 + 1 and lines[-1].startswith("CycleQD + SVD mutation + elite sampling,method,0 1,6,")


def test_unequal_budgets_are_flagged_and_bad_inputs_refused(runs, tmp_path, capsys):
    other, _ = finished_run(tmp_path, "cma-es", 5, generations=4)
    code, out, _ = compare(capsys, runs[0][0], other, "--no-chart")
    assert code == 0 and "budgets (models evaluated in the search) differ" in out and "CMA-ES: 4" in out
    running, _ = finished_run(tmp_path, "qd-none-random", 7, stop_after=6)
    code, _, err = compare(capsys, runs[0][0], running, "--no-chart")
    assert code == 2 and "is in phase search" in err and "compare reads finished runs only" in err
    code, _, err = compare(capsys, runs[0][0], runs[0][0], "--no-chart")
    assert code == 2 and "several runs with the same seed" in err
    code, _, err = compare(capsys, tmp_path / "nothing", "--no-chart")
    assert code == 2 and "has no state.h5" in err
