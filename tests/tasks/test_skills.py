"""The synthetic-skills task: deterministic items, exact-match scoring, settings errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cqd_mpi import schema
from cqd_mpi.demo import llm as demo
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks import task_class
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.skills import SKILLS, Settings, SkillsTask, Solver, items


def make_task(**settings) -> SkillsTask:
    return SkillsTask(name="t", data=None, settings=schema.build(Settings, settings, "settings"),
                      context=TaskContext())


class Scripted:
    """A policy that answers from a table of prompt -> completion."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.calls.append((list(prompts), max_new_tokens))
        return [self.answers[p] for p in prompts]


def test_kind_is_registered():
    assert task_class("skills") is SkillsTask


def test_answers_of_each_skill():
    assert SKILLS["reverse"].solve("stone") == "enots"
    assert SKILLS["sort"].solve("93103") == "01339"
    assert SKILLS["shift"].solve("abz") == "bca"


def test_items_are_deterministic_distinct_and_within_settings():
    settings = Settings(skill="sort", n_items=200, min_length=4, max_length=6, seed=3)
    first, again = items(settings), items(settings)
    assert first == again
    assert list(first)[:2] == ["sort-0000", "sort-0001"]
    prompts = [p for p, _ in first.values()]
    assert len(set(prompts)) == 200
    for question, answer in first.values():
        digits = question.removeprefix("sort:").removesuffix("=")
        assert 4 <= len(digits) <= 6 and digits.isdigit()
        assert answer == "".join(sorted(digits))
    assert items(dataclasses.replace(settings, seed=4)) != first


def test_reference_solutions_score_one():
    task = make_task(skill="shift", n_items=30)
    results = task.reference_results(task.item_ids())
    assert [r.score for r in results] == [1.0] * 30


def test_exact_match_scoring_of_known_answers():
    task = make_task(skill="reverse", n_items=4, min_length=3, max_length=5)
    ids = task.item_ids()
    truth = {task._items[i][0]: task._items[i][1] for i in ids}
    prompts = list(truth)
    policy = Scripted({
        prompts[0]: truth[prompts[0]],
        prompts[1]: truth[prompts[1]] + " \n",
        prompts[2]: truth[prompts[2]] + "x",
        prompts[3]: truth[prompts[3]][:-1],
    })
    results = task.evaluate(policy, ids)
    assert [r.score for r in results] == [1.0, 1.0, 0.0, 0.0]
    assert task.metric(results) == 0.5
    assert results[2].detail == {"expected": truth[prompts[2]], "completion": truth[prompts[2]] + "x"}
    assert policy.calls == [(prompts, 6)]


def test_results_follow_the_requested_order():
    task = make_task(skill="sort", n_items=10)
    ids = task.item_ids()[::-1][:5]
    assert [r.item_id for r in task.evaluate(Solver(), ids)] == ids


def test_unknown_item_is_an_error():
    task = make_task(skill="sort", n_items=5)
    with pytest.raises(TaskError, match=r"unknown item ids.*'sort-0099'"):
        task.evaluate(Solver(), ["sort-0099"])


@pytest.mark.parametrize(("settings", "message"), [
    ({"skill": "multiply"}, r"settings\.skill: expected one of reverse, sort, shift, got 'multiply'"),
    ({"skill": "sort", "min_length": 5, "max_length": 3}, r"settings\.max_length: expected 1 <= min_length"),
    ({"skill": "sort", "n_items": 1}, r"settings\.n_items: expected an integer >= 2"),
    ({"skill": "sort", "n_items": 600, "min_length": 1, "max_length": 3}, r"settings\.n_items: expected at most half of the 1110 possible inputs of 1\.\.3 symbols, got 600"),
    ({"skill": "sort", "max_new_tokens": 0}, r"settings\.max_new_tokens: expected an integer >= 1"),
    ({"skill": "sort", "lenght": 3}, r"settings: unknown key 'lenght'"),
    ({"skill": "sort", "n_items": "many"}, r"settings\.n_items: expected an integer, got 'many'"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        schema.build(Settings, settings, "settings")


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """Tiny demo models trained on short inputs until they answer some items right and some wrong."""
    recipe = demo.TrainingRecipe(n_items=40, min_length=2, max_length=4, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, batch_size=32, base_steps=300, expert_steps=30)
    return demo.build(recipe, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
@pytest.mark.parametrize("skill", ["reverse", "sort"])
def test_scores_of_a_real_model_match_one_by_one_greedy_decoding(trained_models, skill):
    """Batched, left-padded scoring through TransformersEngine equals decoding each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings

    recipe, expert = trained_models.recipe, trained_models.experts[skill]
    task = make_task(**recipe.task_settings(skill))
    results = task.evaluate(TransformersEngine(expert, device="cpu", settings=TransformersSettings(batch_size=64)), task.item_ids())

    model = AutoModelForCausalLM.from_pretrained(expert)
    tokenizer = AutoTokenizer.from_pretrained(expert)
    expected_scores = []
    for item_id in task.item_ids():
        question, answer = task._items[item_id]
        ids = tokenizer(question, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=recipe.max_length + 1, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected_scores.append(float(completion == answer))
    assert 0 < sum(expected_scores) < len(expected_scores)
    assert [r.score for r in results] == expected_scores
    assert task.metric(results) == sum(expected_scores) / len(expected_scores)
