"""The CycleQD authors' MBPP+ text handling (protocol `paper`), against their code read line by line.

Every expected string here was written from reading SakanaAI/CycleQD at 3d14971:
evaluation/fishfarm/fishfarm/tasks/evalplus/data.py:40-56 (instruction, prefill),
tasks/mbpp.py:12-42 and models/vllm_model.py:47-69 (the prompt: the template with
add_generation_prompt, then the prefill), generation.py:57-59 (the completion cut at its first
fence), sanitization.py:74-123 and 171-180 (the sanitizer, on prompt + "\\n" + completion).
"""

import pytest

from cqd_mpi.tasks.mbpp import authors as mbpp_authors
from tests.tasks.helpers import make_task

MBPP_2_PAPER_PROMPT = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate and "
    "reliable responses to user instructions.\n"
    "\n"
    "@@ Instruction:\n"
    "Write a function to find the shared elements from the given two lists. Your code should satisfy the "
    "following assertion:\n"
    "```python\n"
    "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
    "```\n"
    "\n"
    "@@ Response:```python"
)
"""tasks/mbpp.py:15 (system text, stripped, then two newlines), :29 ('@@ Instruction:\\n', the
instruction stripped, two newlines), :35 ('@@ Response:' with no newline), then the prefill
'```python' (data.py:55, vllm_model.py:68). The instruction: the docstring's text before
'assert', stripped, a period if missing, ' Your code should satisfy the following assertion:'
and the assertion in a python fence (data.py:43-54)."""

PERIMETER = "def square_perimeter(a):\n"

EDGE_CASES = [
    # (name, completion after the '```python' prefill, what the authors test (after the
    #  prompt's docstring), authors' verdict, evalplus 0.3.1's verdict)
    ("explanation after the fence", "\n" + PERIMETER + "    return 4 * a\n```\nThis multiplies the side by four.",
     PERIMETER + "    return 4 * a", "pass", "pass"),
    ("two-space indent", "\n" + PERIMETER + "  return 4 * a\n```", None, "no-entry-point", "pass"),
    ("a global after the def", "\n" + PERIMETER + "    return SIDES * a\nSIDES = 4\n```",
     PERIMETER + "    return SIDES * a", "runtime", "pass"),
    ("return on the def line", "\ndef square_perimeter(a): return 4 * a\n```", None, "no-entry-point", "pass"),
    ("no return at all", "\n" + PERIMETER + "    print(4 * a)\n```", None, "no-entry-point", "wrong-answer"),
    ("tab indent", "\n" + PERIMETER + "\treturn 4 * a\n```", None, "no-entry-point", "pass"),
    ("three-space indent", "\n" + PERIMETER + "   side = a\n   return 4 * side\n```", None, "no-entry-point", "pass"),
    ("a helper after the entry point, then a print",
     "\n" + PERIMETER + "    return times_four(a)\n\ndef times_four(x):\n    return 4 * x\n\nprint(square_perimeter(2))\n```",
     PERIMETER + "    return times_four(a)\n\ndef times_four(x):\n    return 4 * x", "pass", "pass"),
    ("an import before and a main guard after",
     "\nimport math\n\n" + PERIMETER + "    return int(math.fsum([a] * 4))\n\nif __name__ == '__main__':\n"
     "    print(square_perimeter(3))\n```",
     "import math\n\n" + PERIMETER + "    return int(math.fsum([a] * 4))", "pass", "pass"),
]
"""Expected code from sanitization.py: an entry function survives only if the text after
`def square_perimeter(` and before the next `\\ndef` holds '    return ' (:95), so two-space,
tab, three-space and one-line bodies are dropped (the three-space padding of :98 comes after
that test); unindented lines that are not a def or an import are dropped (:103-109, :52-54),
and everything from an unindented `if` or `print` on (:56-59); other defs are kept when they
parse (:113-121). None: nothing but the docstring is left."""


def test_the_instruction_and_prompt_of_mbpp_2_are_the_authors_byte_for_byte():
    task = make_task(protocol="paper")
    assert task.prompt_text("Mbpp/2") == MBPP_2_PAPER_PROMPT
    assert mbpp_authors.instruction(task.problems["Mbpp/2"]["prompt"]).startswith(
        "Write a function to find the shared elements from the given two lists. Your code")
    assert mbpp_authors.instruction('"""\nCount the words\nassert f("a b") == 2\n"""\n') == (
        'Count the words. Your code should satisfy the following assertion:\n```python\nassert f("a b") == 2\n```')


@pytest.mark.parametrize(("name", "completion", "tested", "paper", "reference"), EDGE_CASES,
                         ids=[case[0] for case in EDGE_CASES])
def test_the_sanitizer_returns_what_the_authors_test(name, completion, tested, paper, reference):
    task = make_task(protocol="paper")
    docstring = task.problems["Mbpp/17"]["prompt"].rstrip("\n")
    want = docstring if tested is None else docstring + "\n\n\n" + tested
    assert task.solution("Mbpp/17", completion) == want


def test_each_protocol_gives_its_own_reference_verdict_on_the_edge_cases():
    """The authors' text sanitizer and evalplus's tree-sitter one disagree on most edge cases;
    each preset reproduces its own reference's verdict (evalplus: sanitize.py keeps any function
    with a return statement, its dependencies and top-level assignments; codegen turns tabs
    into four spaces, provider/hf.py:104 and vllm.py:68)."""
    ids = ["Mbpp/17"] * len(EDGE_CASES)
    for protocol, column in (("paper", 3), ("reference", 4)):
        task = make_task(protocol=protocol, min_time_limit=0.5)
        codes = [task.solution("Mbpp/17", case[1]) for case in EDGE_CASES]
        results = task.score(ids, codes)
        got = {case[0]: "pass" if r.error is None else r.error for case, r in zip(EDGE_CASES, results)}
        assert got == {case[0]: case[column] for case in EDGE_CASES}, protocol


def test_text_without_the_entry_point_keeps_only_what_parses():
    assert mbpp_authors.sanitize_code("x = 1\ndef other(a):\n    return a", "f") == "x = 1\ndef other(a):\n    return a"
    assert mbpp_authors.sanitize_code("def f (a):\n    return a\ndef g(:\n    pass", "f") == "def f(a):\n    return a"
    with pytest.raises(mbpp_authors.PromptShapeError, match="no assert"):
        mbpp_authors.instruction('"""\nNothing to check.\n"""')
