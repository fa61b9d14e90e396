"""HumanEval+ through the MBPP+ harness (`dataset: humaneval`): evalplus's HumanEvalPlus format,
its prompt, stops and sanitizer, the same sandbox and judges. The fixture holds HumanEval/0, /2
and /32 in HumanEvalPlus v0.1.10's jsonl format (evalplus/data/humaneval.py, data/utils.py:152),
inputs trimmed to a handful (tests/fixtures/humaneval/README.md)."""

import pytest

from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks.mbpp import default_data_path
from tests.tasks.helpers import HUMANEVAL_FIXTURE, MBPP_FIXTURE, ScriptedModel, canonical, make_task

IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/32"]
HUMANEVAL = {"dataset": "humaneval", "instruction": "evalplus"}
WRONG_0 = "def has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold for a in numbers for b in numbers)"
WRONG_2 = "def truncate_number(number):\n    return round(number % 1.0, 1)"
OTHER_ROOT_32 = ("import math\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n"
                 "def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    if poly(xs, lo) > 0:\n        lo, hi = hi, lo\n"
                 "    for _ in range(200):\n        mid = (lo + hi) / 2\n        if poly(xs, mid) > 0:\n            hi = mid\n"
                 "        else:\n            lo = mid\n    return hi")


def test_humaneval_plus_data_and_its_refusals(tmp_path, monkeypatch):
    task = make_task(HUMANEVAL_FIXTURE, protocol="reference", **HUMANEVAL)
    assert task.item_ids() == IDS
    assert task.inputs("HumanEval/2") == [[3.5], [1.33], [123.456], [999.99999], [0.04320870526393539], [1.5], [1e-05]]
    assert task.groundtruth("HumanEval/0").outputs == [True, False, True, False, True, True, False,  # base
                                                        False, False, True, False]  # plus
    with pytest.raises(TaskError, match=r"expected HumanEval\+ problems .* got MBPP\+ ones \('Mbpp/2'\); "
                                         r"set `dataset: mbpp`"):
        make_task(MBPP_FIXTURE, **HUMANEVAL).item_ids()
    with pytest.raises(TaskError, match=r"set `dataset: humaneval`"):
        make_task(HUMANEVAL_FIXTURE).item_ids()
    with pytest.raises(ConfigError, match=r"tasks\[0\].settings.instruction: .* expected 'evalplus' with dataset "
                                          r"'humaneval', got 'assertion'"):
        make_task(HUMANEVAL_FIXTURE, protocol="paper", dataset="humaneval")
    no_plus = tmp_path / "HumanEvalPlus.jsonl"
    no_plus.write_text(HUMANEVAL_FIXTURE.read_text().splitlines()[0].replace('"plus_input"', '"other"') + "\n")
    with pytest.raises(TaskError, match=r"HumanEval\+ data .*plus_input not found in HumanEval\+ #HumanEval/0"):
        make_task(no_plus, **HUMANEVAL).item_ids()
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    assert default_data_path("v0.1.10", "humaneval")[0].name == "HumanEvalPlus-v0.1.10.jsonl"
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(tmp_path / "absent.jsonl"))
    with pytest.raises(TaskError, match=r"HumanEval\+ data file .*absent.jsonl does not exist.* "
                                        r"set HUMANEVAL_OVERRIDE_PATH.*get_human_eval_plus\(version=\"v0.1.10\"\)"):
        make_task(None, **HUMANEVAL).item_ids()


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_reference_solutions_pass_and_wrong_ones_fail(protocol):
    """Canonical solutions pass, wrong ones fail, under both presets. HumanEval/32 (find_zero) is
    judged by its oracle, |poly(xs, out)| <= atol, so another root passes the `paper` judge;
    evalplus 0.3.1's untrusted_check (`reference`) fails every find_zero solution, the canonical
    one included: its oracle `continue`s before recording the input's pass
    (evalplus/eval/__init__.py:186-189, then 276-277), a bug fixed after 0.3.1, kept here as
    that release scores."""
    task = make_task(HUMANEVAL_FIXTURE, protocol=protocol, **HUMANEVAL)
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/32"]
    codes = [canonical(task, "HumanEval/0"), canonical(task, "HumanEval/2"), WRONG_0, WRONG_2,
             canonical(task, "HumanEval/32"), OTHER_ROOT_32]
    find_zero = (1.0, None) if protocol == "paper" else (0.0, "wrong-answer")
    assert [(r.score, r.error) for r in task.score(ids, codes)] == [
        (1.0, None), (1.0, None), (0.0, "wrong-answer"), (0.0, "wrong-answer"), find_zero, find_zero]


def test_evalplus_prompts_stops_and_sanitizer():
    """`reference`: evalplus's chat instruction over the fenced prompt; with prompt_format
    'completion', HumanEval's extra stops and the prompt put before the completion
    (codegen.py:79-89) so a bare body scores."""
    task = make_task(HUMANEVAL_FIXTURE, protocol="reference", **HUMANEVAL)
    user = task.conversation("HumanEval/2")[-2]["content"]
    assert user.endswith("```\ndef truncate_number(number: float) -> float:" + user.split("float:", 1)[1])
    completion = make_task(HUMANEVAL_FIXTURE, protocol="reference", prompt_format="completion", stop=None,
                           task_ids=IDS[:2], **HUMANEVAL)
    assert {"\ndef ", "\nclass ", "\nassert "} <= set(completion.stop_strings())
    model = ScriptedModel({"has_close_elements": "    return False\n\ndef unrelated():\n    pass\n",
                           "truncate_number": "    return number % 1.0\n\nassert truncate_number(3.5) == 0.5\n"})
    results = completion.evaluate(model, IDS[:2])
    assert [(r.score, r.error) for r in results] == [(0.0, "wrong-answer"), (1.0, None)]
    assert results[1].detail["solution"].startswith("def truncate_number(number: float) -> float:")
    assert "unrelated" not in results[0].detail["completion"]
