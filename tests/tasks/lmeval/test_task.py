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
from tests.tasks.lmeval.conftest import FIXTURES


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
    ({"task": "cqd_mc", "task_config": {"dataset_kwargs": {"data_files": {"test": "/nonexistent/mc.jsonl"}}}},
     "tasks[0].settings.task: the data of lm-eval task 'cqd_mc' (", ),
    ({"task": "cqd_mc", "task_config": {"dataset_path": "cqd-nobody/no-such-dataset", "dataset_kwargs": None}},
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
    ({"task": "cqd_mc", "include_path": "tasks"}, "tasks[0].settings.include_path: expected an absolute path"),
    ({"task": "cqd_mc", "colour": 1}, "tasks[0].settings: unknown key 'colour'"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, lmeval_dir, settings, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, lmeval_dir, settings)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_hub_fetch_hint_says_how(tmp_path, lmeval_dir):
    with pytest.raises(ConfigError, match=r"HF_DATASETS_CACHE.*HF_HUB_OFFLINE=1"):
        _load(tmp_path, lmeval_dir, {"task": "cqd_mc", "task_config": {"dataset_path": "cqd-nobody/x",
                                                                        "dataset_kwargs": None}})


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


def test_few_shot_prompts_do_not_depend_on_the_documents_before_them(lmeval_dir):
    """lm-eval draws random few-shot examples from one generator in document order; here each
    document's draw is seeded by the document, so sharding cannot change an item's prompt."""
    task = make_task(lmeval_dir, task="cqd_mc", num_fewshot=2, fewshot_seed=7).resolved.tasks["cqd_mc"]
    docs = list(task.eval_docs)
    alone = task.fewshot_context(docs[5], 2)
    for doc in docs[:5]:
        task.fewshot_context(doc, 2)
    assert task.fewshot_context(docs[5], 2) == alone
    assert alone.count("Question:") == 3
    other = make_task(lmeval_dir, task="cqd_mc", num_fewshot=2, fewshot_seed=8).resolved.tasks["cqd_mc"]
    assert [other.fewshot_context(d, 2) for d in docs] != [task.fewshot_context(d, 2) for d in docs]
