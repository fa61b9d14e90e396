"""kind: lm-eval: items are documents, scores are lm-eval's per-sample metrics (equal to HFLM's),
and every bad input is refused when the config is loaded, in one line naming the key."""

from __future__ import annotations

import math
import shutil
import sys

import pytest

from cqd_mpi.errors import ConfigError, MissingDependency
from cqd_mpi.run import config as config_mod
from cqd_mpi.tasks.base import TaskContext
from tests.tasks.lmeval.conftest import FIXTURES, evaluate_all, write_task_dir


def make_task(lmeval_dir, **settings):
    from cqd_mpi import schema
    from cqd_mpi.tasks.lmeval.task import LmEvalTask, Settings

    built = schema.build(Settings, {"include_path": str(lmeval_dir), **settings}, "settings")
    return LmEvalTask(name=settings["task"], data=None, settings=built, context=TaskContext())


@pytest.mark.parametrize("task,options,filter_key,metric", [
    ("cqd_mc", {}, "none", "acc"),
    ("cqd_mc", {"metric": "acc_norm"}, "none", "acc_norm"),
    ("cqd_gen", {}, "strict-match", "exact_match"),
    ("cqd_gen", {"filter": "flexible-extract"}, "flexible-extract", "exact_match"),
    ("cqd_ll", {}, "none", "acc"),
])
def test_item_scores_are_hflm_per_sample_metrics(hf_engine, hflm_reference, lmeval_dir, task, options,
                                                 filter_key, metric):
    lm_task = make_task(lmeval_dir, task=task, **options)
    ids = lm_task.item_ids()
    assert ids == [f"{task}/{i}" for i in range(len(hflm_reference["samples"][task]) // (1 + (task == "cqd_gen")))]
    results = lm_task.evaluate(hf_engine, ids[5:]) + lm_task.evaluate(hf_engine, ids[:5])  # any batching
    expected = {f"{task}/{s['doc_id']}": float(s[metric]) for s in hflm_reference["samples"][task]
                if s["filter"] == filter_key}
    assert {r.item_id: r.score for r in results} == expected
    assert all(r.error is None for r in results)
    mean = lm_task.metric(results)
    assert math.isclose(mean, float(hflm_reference["results"][task][f"{metric},{filter_key}"]), abs_tol=1e-12)


def _load(tmp_path, lmeval_dir, settings, engine=None):
    config = {"tasks": [{"name": "skill", "kind": "lm-eval", "settings": {"include_path": str(lmeval_dir),
                                                                        **settings}}]}
    if engine:
        config["engine"] = {"kind": engine}
    return config_mod.from_dict(config, root=tmp_path, tasks_only=True)


@pytest.mark.parametrize("settings,message", [
    ({"task": "cqd_mc", "dataset_kwargs": {"data_files": {"test": "/nonexistent/mc.jsonl"}}},
     "tasks[0].settings.task: the data of lm-eval task 'cqd_mc' (", ),
    ({"task": "cqd_mc", "dataset_path": "cqd-nobody/no-such-dataset", "dataset_kwargs": None},
     "tasks[0].settings.task: lm-eval task 'cqd_mc' needs its dataset from the Hugging Face Hub"),
    ({"task": "cqd_roll"}, "tasks[0].settings.metric: lm-eval task 'cqd_roll' has no metric where higher is better"),
    ({"task": "cqd_roll", "metric": "bits_per_byte"},
     "tasks[0].settings.metric: 'bits_per_byte' of lm-eval task 'cqd_roll' is aggregated over the corpus"),
    ({"task": "cqd_ll", "metric": "perplexity"},
     "tasks[0].settings.metric: 'perplexity' of lm-eval task 'cqd_ll' is aggregated over the corpus (perplexity)"),
    ({"task": "cqd_gen", "gen_kwargs": {"do_sample": True, "temperature": 0.7}},
     "tasks[0].settings.gen_kwargs: lm-eval task 'cqd_gen' samples"),
    ({"task": "cqd_gen", "filter": "loose"}, "tasks[0].settings.filter: lm-eval task 'cqd_gen' has filters"),
    ({"task": "cqd_mc", "include_path": "/no-such-folder"}, "tasks[0].settings.include_path: expected a folder"),
    ({"task": "cqd_mc", "include_path": "no-such-folder"}, "tasks[0].settings.include_path: expected a folder of "
     "lm-eval task YAMLs, but {tmp_path}/no-such-folder is not a directory"),
    ({"task": "cqd_mc", "colour": 1}, "tasks[0].settings: unknown key 'colour', neither a setting of kind 'lm-eval' "
     "nor a field of lm-eval's TaskConfig; expected one of task, include_path,"),
    ({"task": "cqd_mc", "doc_to_txt": "{{question}}"}, "tasks[0].settings: unknown key 'doc_to_txt', neither a "
     "setting of kind 'lm-eval' nor a field of lm-eval's TaskConfig; closest valid keys: doc_to_text"),
    ({"task": "cqd_mc", "num_fewshots": 2}, "closest valid keys: num_fewshot"),
    ({"task": "cqd_gen", "unsafe_code": True},
     "tasks[0].settings.task: lm-eval task 'cqd_gen' runs the model's code in this process (unsafe_code)"),
    ({"task": "cqd_mc", "task_config": {"doc_to_text": "x"}},
     "tasks[0].settings.task_config: give lm-eval's TaskConfig keys directly under settings"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, lmeval_dir, settings, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, lmeval_dir, settings)
    text = str(caught.value)
    assert message.format(tmp_path=tmp_path) in text and "\n" not in text, text


def test_task_config_fields_pass_through_and_include_path_is_relative_to_the_config(tmp_path):
    """TaskConfig's fields are top-level settings (here a prompt and a metric list lm-eval applies), and
    a relative include_path is the config file's folder's, named absolutely in the frozen config."""
    write_task_dir(tmp_path / "tasks")
    config = _load(tmp_path, "tasks", {"task": "cqd_mc", "doc_to_text": "Q: {{question}}\nA:",
                                       "metric_list": [{"metric": "acc_norm", "higher_is_better": True}]})
    settings = config.to_dict()["tasks"][0]["settings"]
    assert settings["include_path"] == str(tmp_path / "tasks") and settings["doc_to_text"].startswith("Q: ")
    task = make_task(settings["include_path"], **{k: v for k, v in settings.items() if k != "include_path"})
    lm_task = task.resolved.tasks["cqd_mc"]
    assert lm_task.fewshot_context(lm_task.eval_docs[0], 0).startswith("Q: ")
    assert task.resolved.metric == "acc_norm"


def test_hub_fetch_hint_says_how(tmp_path, lmeval_dir):
    with pytest.raises(ConfigError, match=r"HF_DATASETS_CACHE.*HF_HUB_OFFLINE=1"):
        _load(tmp_path, lmeval_dir, {"task": "cqd_mc", "dataset_path": "cqd-nobody/x", "dataset_kwargs": None})


def test_loglikelihood_tasks_need_the_capability(tmp_path, lmeval_dir):
    """An engine with text generation only runs generate_until tasks and is refused the others."""
    plugin = "tests.engines.plugin_engine:PluginEngine"
    assert _load(tmp_path, lmeval_dir, {"task": "cqd_gen"}, engine=plugin).tasks[0].name == "skill"
    with pytest.raises(ConfigError, match=r"tasks\[0\]: task 'skill' \(kind 'lm-eval'\) needs log-likelihoods"):
        _load(tmp_path, lmeval_dir, {"task": "cqd_mc"}, engine=plugin)


@pytest.mark.slow
def test_unknown_name_gives_closest_names_and_rejected_yamls(tmp_path, lmeval_dir):
    """lm-eval's whole registry is searched (seconds), and a YAML lm-eval cannot read is named."""
    folder = tmp_path / "tasks"
    shutil.copytree(lmeval_dir, folder)
    shutil.copy(FIXTURES / "broken.yaml.txt", folder / "broken.yaml")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, folder, {"task": "cqd_mcq"})
    text = str(caught.value)
    assert text.startswith("tasks[0].settings.task: unknown lm-eval task 'cqd_mcq'; closest lm-eval names: cqd_mc")
    assert f"lm-eval rejects {folder / 'broken.yaml'}: ParserError" in text and "\n" not in text


def test_missing_extra_names_it(monkeypatch):
    from cqd_mpi.tasks.lmeval import require

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingDependency, match=r"pip install 'cqd_mpi\[lm-eval\]'"):
        require()


@pytest.mark.parametrize("weighting", ["documents", "tasks"])
def test_a_group_scores_its_sub_tasks_documents(hf_engine, hflm_reference, lmeval_dir, weighting):
    group = make_task(lmeval_dir, task="cqd_group", group_weighting=weighting)
    ids = group.item_ids()
    assert ids == [f"cqd_ll/{i}" for i in range(8)] + [f"cqd_mc/{i}" for i in range(12)]
    results = group.evaluate(hf_engine, ids[6:14]) + group.evaluate(hf_engine, ids[:6] + ids[14:])
    expected = {f"{task}/{s['doc_id']}": float(s["acc"]) for task in ("cqd_mc", "cqd_ll")
                for s in hflm_reference["samples"][task]}
    assert {r.item_id: r.score for r in results} == expected
    means = [float(hflm_reference["results"][task]["acc,none"]) for task in ("cqd_mc", "cqd_ll")]
    want = sum(expected.values()) / len(expected) if weighting == "documents" else sum(means) / 2
    assert group.metric(results) == pytest.approx(want, abs=1e-12)
    assert means[0] != means[1], "sub-tasks of different sizes and scores tell the weightings apart"


@pytest.fixture(scope="module")
def fewshot_reference(tiny_family, lmeval_dir) -> dict:
    """lm-eval's own HFLM on the multiple-choice task with two examples drawn at random (seed 7)."""
    return evaluate_all("hf", lmeval_dir, tasks=["cqd_mc"], num_fewshot=2, fewshot_random_seed=7,
                        model_args=f"pretrained={tiny_family['base']},dtype=float32", batch_size=8, device="cpu")


def test_few_shot_prompts_equal_lm_evals_whatever_the_chunks(hf_engine, fewshot_reference, lmeval_dir):
    """lm-eval draws each document's examples from one generator in document order; an item's
    prompt and score equal simple_evaluate's however the documents are shared out (chunks in any
    order, on any worker: here one engine, chunks out of order, one chunk scored twice)."""
    task = make_task(lmeval_dir, task="cqd_mc", num_fewshot=2, fewshot_seed=7)
    ids = task.item_ids()
    chunks = [ids[9:], ids[3:9:2], ids[4:9:2], ids[:3], ids[9:]]
    results = {r.item_id: r for chunk in chunks for r in task.evaluate(hf_engine, chunk)}
    samples = {f"cqd_mc/{s['doc_id']}": s for s in fewshot_reference["samples"]["cqd_mc"]}
    assert samples.keys() == results.keys()
    assert all(s["arguments"][0][0].count("Question:") == 3 for s in samples.values()), "two examples and the doc"
    assert {i: r.detail["prompt_hash"] for i, r in results.items()} == {i: s["prompt_hash"] for i, s in samples.items()}
    assert {i: r.score for i, r in results.items()} == {i: float(s["acc"]) for i, s in samples.items()}
    assert len({s["prompt_hash"] for s in samples.values()}) == len(samples)
