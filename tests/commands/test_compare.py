"""`python -m cqd_mpi compare`: Tables 1 and 2 over real state files of finished runs, with
intervals over seeds, paired differences against the reference, costs, and the budget curve."""

import json
import struct

import numpy as np
import pytest
import yaml

from cqd_mpi.cli import main
from cqd_mpi.qd.coefficients import CMAES
from cqd_mpi.qd.noncyclic import NonCyclicQD
from cqd_mpi.run.state import HDF5Backend
from tests.qd.helpers import make_core, run_all

stats = pytest.importorskip("scipy.stats", reason="needs scipy: pip install 'cqd_mpi[stats]'")

TRIALS = {
    "cycleqd-svd-elite": (None, "svd", "elite"),
    "cycleqd-none-random": (None, "none", "random"),
    "qd-none-random": (NonCyclicQD, "none", "random"),
    "cma-es": (CMAES, "none", "elite"),
}

pytestmark = pytest.mark.extra("baselines")  # the trials include cma-es and nsga2


def vary_by_seed(core, name, seed, *, timed):
    """Test scores that vary with the seed as real runs' do (the fake scorer keys them by model id
    alone): the base, experts and average by the seed only, as runs of one seed share them, the
    final model by seed and trial; and, if `timed`, search timings of 0.25 s x (seed + 1) a model."""
    shared = np.random.default_rng(seed).normal(0, 0.02, size=(len(core.models), 3))
    own = np.random.default_rng([seed, list(TRIALS).index(name)]).normal(0, 0.05, size=3)
    for record in core.models:
        record.test_scores = record.test_scores + shared[record.id] + (own if record.kind == "aggregate" else 0)
    for row in core.history:
        row.total_s = 0.25 * (seed + 1) if timed else float("nan")


def finished_run(root, name, seed, *, generations=6, stop_after=None, timed=True, mutation=None):
    cls, trial_mutation, sampling = TRIALS[name]
    mutation = mutation or trial_mutation
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
    vary_by_seed(core, name, seed, timed=timed)
    path = root / f"{name}-{seed}"
    path.mkdir()
    config = yaml.safe_dump({"qd": {"mutation": {"kind": mutation}}, "runtime": {"seed": seed}})
    HDF5Backend(path / "state.h5").save(core, attrs={"config": config})
    return path, core


def compare(capsys, *args):
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


SEEDS = (0, 1, 2)
CYCLEQD = "CycleQD + SVD mutation + elite sampling"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return [finished_run(root, name, seed) for name in TRIALS for seed in SEEDS]


def final_avg(runs, name):
    """The per-seed mean over tasks of a trial's final model, in seed order."""
    cores = [core for (_, core), (n, _) in zip(runs, [(n, s) for n in TRIALS for s in SEEDS]) if n == name]
    return np.array([[r for r in core.models if r.kind == "aggregate"][-1].test_scores.mean() for core in cores])


def test_json_table_has_every_group_with_mean_interval_paired_differences_and_costs(runs, tmp_path, capsys):
    code, out, err = compare(capsys, *(p for p, _ in runs), "--format", "json", "--chart", tmp_path / "c.png")
    assert code == 0, err
    report = json.loads(out)
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["base", "expert code", "expert os", "expert db", "naive average",
                          CYCLEQD, "CycleQD + no mutation + random sampling",
                          "QD + no mutation + random sampling", "CMA-ES"]
    cores = {(name, seed): core for (path, core), (name, seed) in
             zip(runs, [(n, s) for n in TRIALS for s in SEEDS])}
    for name, label in (("cycleqd-svd-elite", CYCLEQD), ("cma-es", "CMA-ES")):
        finals = np.stack([[r for r in cores[name, s].models if r.kind == "aggregate"][-1].test_scores
                           for s in SEEDS])
        row = rows[label]
        assert row["seeds"] == [0, 1, 2] and row["budget"] == 6 and row["models_evaluated"] == [6, 6, 6]
        assert row["search_seconds"] == pytest.approx([6 * 0.25, 6 * 0.5, 6 * 0.75])
        np.testing.assert_allclose([row["mean"][t] for t in ("code", "os", "db")], finals.mean(axis=0))
        np.testing.assert_allclose(row["mean"]["avg"], finals.mean(axis=1).mean())
        np.testing.assert_allclose(row["std"]["avg"], finals.mean(axis=1).std(ddof=1))
        low, high = stats.t.interval(0.95, 2, loc=finals[:, 1].mean(), scale=stats.sem(finals[:, 1]))
        assert (row["interval"]["os"]["low"], row["interval"]["os"]["high"]) == pytest.approx((low, high))
    base = np.stack([cores["cycleqd-svd-elite", s].models[0].test_scores for s in SEEDS])
    np.testing.assert_allclose([rows["base"]["mean"][t] for t in ("code", "os", "db")], base.mean(axis=0))
    assert report["note"] is None and report["reference"] == CYCLEQD and report["level"] == 0.95
    assert rows[CYCLEQD]["paired"] is None
    cma = rows["CMA-ES"]["paired"]["avg"]
    expected = stats.ttest_rel(final_avg(runs, "cma-es"), final_avg(runs, "cycleqd-svd-elite"))
    assert cma["p_value"] == pytest.approx(expected.pvalue) and cma["seeds"] == [0, 1, 2]
    ci = expected.confidence_interval(0.95)
    assert (cma["difference"]["low"], cma["difference"]["high"]) == pytest.approx((ci.low, ci.high))
    wins = int((final_avg(runs, "cma-es") > final_avg(runs, "cycleqd-svd-elite")).sum())
    assert (cma["higher"], cma["lower"], cma["ties"]) == (wins, 3 - wins, 0)
    assert cma["verdict"] == ("unresolved" if ci.low < 0 < ci.high else "higher" if ci.low > 0 else "lower")
    assert [r["search_seconds"] for r in report["runs"][:3]] == pytest.approx([1.5, 3.0, 4.5])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_and_csv(runs, tmp_path, capsys):
    code, out, _ = compare(capsys, *(p for p, _ in runs), "--chart", tmp_path / "c.png")
    assert code == 0
    assert "| # | model | code | os | db | Avg | seeds | models | search s |" in out
    assert "| 8 | CMA-ES |" in out and "| 3 | 6 | 3.0 |" in out and f"wrote {tmp_path / 'c.png'}" in out
    assert "95% confidence interval [low, high] (Student t with n-1 degrees of freedom" in out
    assert f"Paired differences against {CYCLEQD}" in out
    assert "| model | seeds | code | os | db | Avg | p (paired t, Avg) | +/-/= (Avg) | verdict (Avg) |" in out
    assert any(line.startswith("| CMA-ES | 3 | ") for line in out.splitlines()[12:])
    code, out, _ = compare(capsys, *(p for p, _ in runs[:3] + runs[-3:]), "--format", "csv", "--no-chart")
    lines = out.strip().splitlines()
    assert lines[0].startswith("model,kind,seeds,budget,models_evaluated,search_s,reference,code_mean,os_mean,"
                               "db_mean,avg_mean,code_std")
    assert "avg_low,code_high" in lines[0] and "avg_diff_high,code_p" in lines[0] and lines[0].endswith("avg_sign_p")
    assert len(lines) == 1 + 5 + 2 and lines[-2].startswith(f"{CYCLEQD},method,0 1 2,6,6 6 6,3.0,,")
    cma = dict(zip(lines[0].split(","), lines[-1].split(",")))
    assert cma["reference"] == CYCLEQD and cma["models_evaluated"] == "6 6 6"
    diff = final_avg(runs, "cma-es") - final_avg(runs, "cycleqd-svd-elite")
    assert float(cma["avg_diff"]) == pytest.approx(diff.mean(), abs=1e-6)
    assert float(cma["avg_p"]) == pytest.approx(stats.ttest_1samp(diff, 0).pvalue, rel=1e-5)


def test_one_seed_shows_no_interval_and_untimed_runs_no_time(runs, tmp_path, capsys):
    untimed, _ = finished_run(tmp_path, "cma-es", 0, timed=False)
    code, out, _ = compare(capsys, runs[0][0], untimed, "--no-chart")
    assert code == 0
    assert "| 5 | CycleQD + SVD mutation + elite sampling | " in out and "[" not in out.split("\n")[7]
    assert "| 6 | CMA-ES |" in out and out.split("\n")[8].endswith("| 1 | 6 | n/a |")
    assert ("paired differences against CycleQD + SVD mutation + elite sampling have no interval: one seed: "
            "no interval (the spread over seeds is unknown)") in out
    assert "| CMA-ES | 1 | " in out and out.rstrip().count("| one seed |") == 6


def test_the_reference_is_explicit(runs, tmp_path, capsys):
    paths = [p for p, _ in runs]
    code, out, _ = compare(capsys, *paths, "--reference", "CMA-ES", "--no-chart", "--format", "json")
    report = json.loads(out)
    rows = {row["model"]: row for row in report["rows"]}
    assert code == 0 and report["reference"] == "CMA-ES" and rows["CMA-ES"]["paired"] is None
    assert rows[CYCLEQD]["paired"]["avg"]["difference"]["mean"] == pytest.approx(
        (final_avg(runs, "cycleqd-svd-elite") - final_avg(runs, "cma-es")).mean())
    code, _, err = compare(capsys, *paths, "--reference", "GA", "--no-chart")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--reference 'GA' is not a row of the table; the rows are: base, expert code" in err
    code, out, _ = compare(capsys, *paths[9:], "--no-chart")
    assert code == 0 and "no paired differences: the runs hold no CycleQD group" in out
    gaussian, _ = finished_run(tmp_path, "cycleqd-svd-elite", 0, mutation="gaussian")
    code, _, err = compare(capsys, *paths[3:6], gaussian, "--no-chart")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "several CycleQD groups (CycleQD + no mutation + random sampling, CycleQD + Gaussian mutation" in err
    assert "none is the paper's; name the reference with --reference LABEL" in err
    code, out, _ = compare(capsys, *paths[3:6], gaussian, "--no-chart", "--reference",
                           "CycleQD + Gaussian mutation + elite sampling")
    assert code == 0 and "Paired differences against CycleQD + Gaussian mutation + elite sampling" in out


def with_curve(source, out, models_evaluated, test_scores):
    """A copy of a finished run whose state.h5 (written with h5py by the state's own writer) also
    holds periodic test scores in the layout a run writes with runtime.test_every."""
    from cqd_mpi.run.state import read_state

    tree = read_state(source / "state.h5")
    tree["curve"] = {"models_evaluated": np.asarray(models_evaluated, dtype=np.int64),
                     "test_scores": np.asarray(test_scores, dtype=np.float64)}
    out.mkdir()
    HDF5Backend(out / "state.h5").save_tree(tree)
    return out


def test_budget_curve(runs, tmp_path, capsys):
    paths = [p for p, _ in runs]
    code, _, err = compare(capsys, paths[0], paths[9], "--no-chart", "--budget-curve", tmp_path / "curve.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "curve.png").exists()
    assert "runtime.test_every: N" in err and str(paths[0]) in err and str(paths[9]) in err
    curved = [with_curve(paths[s], tmp_path / f"cycleqd-{s}", [2, 4], [[0.2, 0.3, 0.4], [0.3, 0.3, 0.5 + s / 10]])
              for s in (0, 1)]
    curved.append(with_curve(paths[9], tmp_path / "cma-0", [3], [[0.5, 0.5, 0.5]]))
    code, out, err = compare(capsys, *curved, paths[10], "--no-chart", "--budget-curve", tmp_path / "curve.png")
    assert code == 0, err
    assert f"the budget curve leaves out runs without periodic test scores (runtime.test_every unset): {paths[10]}" in out
    png = (tmp_path / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (840, 504)
    code, out, _ = compare(capsys, *curved, "--format", "json", "--no-chart")
    assert [r["curve_points"] for r in json.loads(out)["runs"]] == [2, 2, 1]
