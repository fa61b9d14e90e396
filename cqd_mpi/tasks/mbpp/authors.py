"""The CycleQD authors' MBPP+ text handling: their instruction, prompt format and code extraction.

Written from reading SakanaAI/CycleQD at 3d14971 (evaluation/fishfarm/fishfarm/tasks/evalplus/
data.py, generation.py, sanitization.py; tasks/mbpp.py; models/vllm_model.py), for protocol
`paper`. It reproduces their strings and their sanitizer's output, quirks included: an entry
function is kept only if it has a line indented by four spaces that starts with `return`,
every unindented line after it that is not a def or an import is dropped, and the completion
is cut at its first code fence. tests/tasks/test_mbpp_authors.py holds the cases, each
checked against the line it comes from.
"""

from __future__ import annotations

import ast
import re

ASSERTION_SUFFIX = "Your code should satisfy the following assertion:"
FENCE = "```"
KEPT_PREFIXES = ("def ", "import ", "from ")
TRIMMING_PREFIXES = ('"""', "if", "print")


class PromptShapeError(ValueError):
    """An MBPP+ prompt without the docstring and assertion the authors' instruction is cut from."""


def instruction(prompt: str) -> str:
    """The user turn: the problem text, a period, the assertion sentence and the assertion in a
    python fence (data.py:40-54)."""
    start, end = prompt.find('"""'), prompt.rfind('"""')
    if start < 0 or end <= start:
        raise PromptShapeError("it has no docstring")
    text = prompt[start + 3:end]
    cut = text.find("assert")
    if cut < 0:
        raise PromptShapeError("its docstring has no assert")
    problem, assertion = text[:cut].strip(), text[cut:].strip()
    if not problem.endswith("."):
        problem += "."
    return f"{problem} {ASSERTION_SUFFIX}\n{FENCE}python\n{assertion}\n{FENCE}"


def prompt_text(*, system_message: str | None, user: str, response_prefix: str) -> str:
    """The authors' instruction-response prompt with their prefill (tasks/mbpp.py:12-42 rendered
    with add_generation_prompt, then the prefill appended: vllm_model.py:47-69). The response
    marker is followed directly by the prefill, with no newline."""
    head = f"{system_message.strip()}\n\n" if system_message else ""
    return f"{head}@@ Instruction:\n{user.strip()}\n\n@@ Response:{response_prefix}"


def solution(*, prompt: str, completion: str, entry_point: str) -> str:
    """The code the authors test for one completion: the completion up to its first fence
    (generation.py:57-59) after the problem's prompt and a newline, sanitized
    (sanitization.py:171-180)."""
    body = completion.split(FENCE, 1)[0]
    return sanitize_code((prompt + "\n" + body).strip(), entry_point).strip()


def sanitize_code(code: str, entry_point: str) -> str:
    """The authors' sanitize_code with its defaults (sanitization.py:74-123)."""
    head = f"def {entry_point}"
    opener = head + "("
    text = ("\n" + code).replace(f"\n{FENCE}python\n", f"\n{FENCE}\n")
    text = next((block for block in text.split(f"\n{FENCE}\n") if head in block), text)
    before, *after = re.split(rf"{re.escape(head)}\s*\(", text)
    returning = [piece for piece in after if "    return " in piece.split("\ndef")[0]]
    entry = opener + opener.join(returning) if returning else ""
    entry = _drop_top_level_lines(_pad_three_space_indents(entry), protect=opener)
    parts = (before + entry).split("\ndef ")
    kept = [parts[0]] + [part for part in parts[1:]
                         if part.strip().startswith((entry_point + " ", entry_point + "(")) or _parses("\ndef " + part)]
    return "\ndef ".join(kept).strip()


def _pad_three_space_indents(code: str) -> str:
    """Lines indented by exactly three characters get a fourth; every line ends with a newline."""
    return "".join((" " if len(line) - len(line.lstrip()) == 3 else "") + line + "\n" for line in code.splitlines())


def _drop_top_level_lines(code: str, *, protect: str) -> str:
    """Drop unindented lines other than defs and imports (the first `protect` line excepted), and
    everything from the first line starting with a docstring quote, `if` or `print`."""
    lines = code.splitlines()
    dropped: set[int] = set()
    protected = False
    for index, line in enumerate(lines):
        if not protected and line.startswith(protect):
            protected = True
            continue
        if not line.strip() or line.startswith(KEPT_PREFIXES):
            continue
        if len(line) == len(line.lstrip()):
            dropped.add(index)
        if line.rstrip().startswith(TRIMMING_PREFIXES):
            dropped.update(range(index, len(lines)))
            break
    return "\n".join(line for index, line in enumerate(lines) if index not in dropped)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError, RecursionError):
        return False
    return True
