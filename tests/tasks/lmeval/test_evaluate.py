"""`evaluate RUN_DIR --suite`: Table 3 for a finished run on a suite of lm-eval tasks; the base's
numbers equal lm_eval.simple_evaluate run directly on the base directory, and a rerun skips
every pair already scored. (Here rather than tests/commands/ to share the HFLM reference.)"""

from __future__ import annotations

import json

import pytest
import yaml

from cqd_mpi.cli import main
from tests.conftest import perturbed_copy, probe_config, write_config
from tests.runtime.helpers import run_cli
from tests.tasks.lmeval.conftest import FIXTURES, write_task_dir


@pytest.fixture(scope="module")
def finished_run(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    config = probe_config(tiny_family, root / "run", **{"qd.generations": 2})
    result = run_cli("run", write_config(root / "config.yaml", config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def _suite(path, lmeval_dir, metric=None, names=("mc", "gen", "ll"), **extra):
    """A suite of the fixture tasks (by default all three); `metric` is the mc task's."""
    tasks = [{"name": name, "kind": "lm-eval", "batch_size": 8,
              "settings": {"task": task, "include_path": str(lmeval_dir)}}
             for name, task in (("mc", "cqd_mc"), ("gen", "cqd_gen"), ("ll", "cqd_ll")) if name in names]
    if metric:
        tasks[0]["settings"]["metric"] = metric
    path.write_text(yaml.safe_dump({"name": "table3", "tasks": tasks, **extra}))  # extra may rename it
    return path


def test_evaluate_writes_the_normalised_table_and_resumes(finished_run, lmeval_dir, hflm_reference, tmp_path,
                                                          capsys):
    suite = _suite(tmp_path / "suite.yaml", lmeval_dir)
    assert main(["evaluate", str(finished_run), "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    results = json.loads((finished_run / "evaluations" / "table3.json").read_text())
    assert set(results["models"]) == {"base", "final", "expert alpha", "expert beta", "expert gamma"}
    base = results["models"]["base"]["scores"]
    reference = hflm_reference["results"]
    assert base["mc"]["score"] == pytest.approx(reference["cqd_mc"]["acc,none"], abs=1e-12)
    assert base["gen"]["score"] == pytest.approx(float(reference["cqd_gen"]["exact_match,strict-match"]), abs=1e-12)
    assert base["ll"]["score"] == pytest.approx(reference["cqd_ll"]["acc,none"], abs=1e-12)
    assert all(s["items"] == (8 if t == "ll" else 12) and s["errors"] == 0
               for m in results["models"].values() for t, s in m["scores"].items())
    assert "| base | 1.000 (" in out and "| final |" in out
    table = json.loads((finished_run / "evaluations" / "table3.table.json").read_text())
    assert table["rows"][0]["model"] == "base"
    assert len((finished_run / "evaluations" / "table3.csv").read_text().splitlines()) == 6
    assert (finished_run / "evaluations" / "table3.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["evaluate", str(finished_run), "--suite", str(suite)]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("every task already scored, skipped") == 5
    assert json.loads((finished_run / "evaluations" / "table3.json").read_text()) == results


def test_a_changed_model_or_task_is_re_scored_and_said_so(finished_run, tiny_family, lmeval_dir, tmp_path, capsys):
    """Stored scores are keyed by the model's weights digest and the task's fingerprint (settings,
    data digest): new weights under the same path, a changed setting or changed data re-score
    that model or task, the rest is skipped, and the output says which and why."""
    tasks = write_task_dir(tmp_path / "tasks")
    data = tmp_path / "mc.jsonl"
    data.write_text((FIXTURES / "mc.jsonl").read_text())
    (tasks / "cqd_mc.yaml").write_text((tasks / "cqd_mc.yaml").read_text().replace(str(FIXTURES / "mc.jsonl"),
                                                                                  str(data)))
    model = perturbed_copy(tiny_family["base"], tmp_path / "model", seed=5, scale=0.25)
    suite = _suite(tmp_path / "suite.yaml", tasks, names=("mc", "ll"), name="changes", models=["base"])
    evaluate = ["evaluate", str(finished_run), "--suite", str(suite), "--model", str(model)]
    results_path = finished_run / "evaluations" / "changes.json"

    def scored(out):
        return sorted(line.split(" (")[0].rsplit(" ", 1)[0] for line in out.splitlines() if " items)" in line)

    assert main(evaluate) == 0
    first = json.loads(results_path.read_text())["models"]
    assert len(scored(capsys.readouterr().out)) == 4

    perturbed_copy(tiny_family["base"], model, seed=6, scale=0.25)  # new weights, same path
    assert main(evaluate) == 0
    out = capsys.readouterr().out
    assert f"model {model}: its weights ({model}) changed since it was scored (sha256:" in out
    assert scored(out) == [f"model {model}: {t}" for t in ("ll", "mc")]
    assert "base: every task already scored, skipped" in out
    second = json.loads(results_path.read_text())["models"]
    assert second["base"] == first["base"] and second[f"model {model}"]["weights"] != first[f"model {model}"]["weights"]

    data.write_text(data.read_text().replace('"answer": 0', '"answer": 1', 1))  # one document's answer
    assert main(evaluate) == 0
    out = capsys.readouterr().out
    assert out.count("task mc changed since it was scored (its settings, data or --limit); re-scoring it") == 2
    assert scored(out) == ["base: mc", f"model {model}: mc"]

    suite = _suite(tmp_path / "suite.yaml", tasks, names=("mc", "ll"), name="changes", models=["base"],
                   metric="acc_norm")
    assert main(evaluate) == 0
    out = capsys.readouterr().out
    assert out.count("task mc changed since it was scored") == 2 and scored(out) == ["base: mc", f"model {model}: mc"]
    assert main(evaluate) == 0
    assert capsys.readouterr().out.count("every task already scored, skipped") == 2


def test_a_bad_suite_is_one_line(finished_run, lmeval_dir, tmp_path, capsys):
    suite = _suite(tmp_path / "suite.yaml", lmeval_dir, models=["final", "teacher"])
    assert main(["evaluate", str(finished_run), "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cqd_mpi: error: ") and "models: expected some of final, experts, base" in err
    assert "\n" not in err


@pytest.mark.mpi
def test_evaluate_under_mpiexec_shards_items_and_equals_one_process(finished_run, lmeval_dir, tmp_path):
    """Two ranks, each with an engine updated in place, batches shared out: the same scores as
    the one-process evaluation (run first if the module's first test did not)."""
    one = _suite(tmp_path / "one.yaml", lmeval_dir, name="one", models=["final", "base"])
    assert main(["evaluate", str(finished_run), "--suite", str(one)]) == 0
    two = _suite(tmp_path / "two.yaml", lmeval_dir, name="two", models=["final", "base"])
    result = run_cli("evaluate", finished_run, "--suite", two, mpi_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| final |") == 1
    scores = {name: json.loads((finished_run / "evaluations" / f"{name}.json").read_text())["models"]
              for name in ("one", "two")}
    assert scores["one"] == scores["two"]
