"""Evaluation protocols: named presets of a task kind's settings.

A researcher either compares with the CycleQD paper, which means scoring exactly as the
authors' released code did (`paper`: SakanaAI/CycleQD at 3d14971, its evaluation/fishfarm),
or reports the benchmark's own numbers (`reference`: evalplus 0.3.1's codegen and evaluate
for MBPP+, AgentBench v0.2 at 41e6807 for DB and OS). Each preset is a table of the task's
settings, so every point on which the two differ is a setting a user can also change alone.
A task config names one with `protocol:` (the config's top-level `protocol` is the default);
its settings are the preset's table with the task's own `settings:` on top, and the frozen
config records them so resolved. docs/protocols.md lists every point with the file and line
of the reference it follows.

A task kind opts in with a class attribute `presets` (one of the tables below, or its own);
kinds without one ignore the run-wide protocol. Item lists a preset needs ship with the
package as ids only (cqd_mpi/tasks/items/), each with where it comes from.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from cqd_mpi.errors import ConfigError

PROTOCOLS = ("paper", "reference")
DEFAULT = "paper"
"""The run-wide default: cqd_mpi reproduces CycleQD, and the paper's Table 1 is what a run is
first compared with; `reference` is one key away."""

ITEMS_DIR = Path(__file__).with_name("items")

# ----------------------------------------------------------------------------- MBPP+

AUTHORS_SYSTEM_MESSAGE = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate and "
    "reliable responses to user instructions."
)
"""The system message of the authors' MBPP task (SakanaAI/CycleQD tasks/mbpp.py:56-60)."""

AUTHORS_MBPP_STOP = ["Instruction:", "Instruction", "Response:", "Response"]
"""The authors' vLLM stop strings for MBPP (tasks/mbpp.py:77)."""

EVALPLUS_INSTRUCTION_PREFIX = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
"""evalplus codegen's instruction for chat models (evalplus 0.3.1 codegen.py:176)."""

EVALPLUS_RESPONSE_PREFIX = (
    "Below is a Python script with a self-contained function that solves the problem and passes "
    "corresponding tests:"
)
"""evalplus codegen's response prefix for chat models (codegen.py:177)."""

EVALPLUS_EOS = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint("]
"""evalplus's stop strings for every model (provider/utility.py:3-10)."""

EVALPLUS_CHAT_STOP = [*EVALPLUS_EOS, "\n```\n"]
"""...and for a model with a chat template (provider/hf.py:38-41, provider/vllm.py:33-36)."""

MBPP_PLUS_PROBLEMS = {"v0.1.0": 399, "v0.2.0": 378}
"""Problems in each MbppPlus release: v0.1.0 is the paper's count; evalplus 0.3.1 loads v0.2.0."""

EVALPLUS_PROBLEMS = {"mbpp": MBPP_PLUS_PROBLEMS, "humaneval": {"v0.1.10": 164}}
"""Problems in each release of the evalplus datasets the MBPP+ harness scores (HumanEvalPlus:
evalplus 0.3.1 loads v0.1.10, the 164 problems of OpenAI's HumanEval)."""

MBPP = {
    "paper": {
        "version": "v0.1.0",
        "prompt_format": "instruction-response",
        "system_message": AUTHORS_SYSTEM_MESSAGE,
        "instruction": "assertion",
        "response_prefix": "```python",
        "stop": AUTHORS_MBPP_STOP,
        "max_new_tokens": 512,
        "sanitizer": "authors",
        "tests": "base",
        "judge": "evalplus-1895d2f6",
        "min_time_limit": 0.2,
        "gt_time_limit_factor": 4.0,
        "memory_mb": 4096,
        "timeout_seconds": None,
    },
    "reference": {
        "version": "v0.2.0",
        "prompt_format": "chat",
        "system_message": None,
        "instruction": "evalplus",
        "response_prefix": f"{EVALPLUS_RESPONSE_PREFIX}\n```python\n",
        "stop": EVALPLUS_CHAT_STOP,
        "max_new_tokens": 768,
        "sanitizer": "evalplus",
        "tests": "base+plus",
        "judge": "evalplus-0.3.1",
        "min_time_limit": 1.0,
        "gt_time_limit_factor": 4.0,
        "memory_mb": 4096,
        "timeout_seconds": 60.0,
    },
}
"""MBPP+ (tasks/mbpp/). `paper`: the authors' instruction-response prompt, their stops, text
sanitizer and time limit, base tests of MbppPlus v0.1.0 judged by the comparison rules of the
evalplus commit they pin; `reference`: evalplus 0.3.1's chat
codegen, tree-sitter sanitizer and evaluate (MBPP+ = base and extra tests) on v0.2.0."""

# -------------------------------------------------------------------------------- DB

DBBENCH = {
    "paper": {
        "item_ids": "cycleqd",
        "max_rounds": 5,
        "max_new_tokens": 512,
        "stop": [],
        "operation_without_sql": "read-answer",
        "metric": "pooled",
    },
    "reference": {
        "item_ids": None,
        "max_rounds": 15,
        "max_new_tokens": 512,
        "stop": [],
        "operation_without_sql": "fail",
        "metric": "category-mean",
    },
}
"""AgentBench's DB task (tasks/dbbench/). `paper`: the authors' 341 items of standard + dev,
5 rounds, their pooled accuracy; `reference`: AgentBench v0.2's dbbench config (15 rounds, the
mean of the SELECT, INSERT and UPDATE accuracies) on the file given (dbbench-std is
data/dbbench/standard.jsonl)."""

# -------------------------------------------------------------------------------- OS

OS = {
    "paper": {
        "item_ids": "cycleqd",
        "include_dev": True,
        "max_rounds": 5,
        "repeats": 5,
        "max_new_tokens": 512,
        "judge_unfinished": True,
        "init_failure": "ignore",
        "turn_seconds": 5.0,
        "observation": "raw",
    },
    "reference": {
        "item_ids": None,
        "include_dev": False,
        "max_rounds": 8,
        "repeats": 1,
        "max_new_tokens": 512,
        "judge_unfinished": False,
        "init_failure": "fail",
        "turn_seconds": None,
        "observation": "cleaned",
    },
}
"""AgentBench's OS task (cqd_mpi/tasks/os_interaction/). `paper`: the authors' 110
fixed items of standard + dev, each pass repeated 5 times and averaged, 5 rounds, an unfinished
episode judged with an empty answer; `reference`: AgentBench v0.2's os-std (all items of the
file, once), 8 rounds, an unfinished episode failed."""


# --------------------------------------------------------------------------- resolving


def presets_of(cls: type) -> dict[str, dict[str, Any]]:
    """The presets a task kind declares (its `presets` class attribute), or none."""
    return getattr(cls, "presets", None) or {}


def resolve(cls: type, *, name: str | None, default: str, settings: dict[str, Any] | None,
            where: str) -> tuple[str | None, dict[str, Any]]:
    """The protocol a task uses and its settings: the preset's table under the task's own keys.

    `name` is the task's `protocol` (None: the run-wide `default`). A kind without presets
    gets (None, its settings unchanged) and refuses a protocol named for it."""
    settings = dict(settings or {})
    table = presets_of(cls)
    kind = getattr(cls, "kind", None) or cls.__name__
    if not table:
        if name is not None:
            raise ConfigError(f"{where}.protocol: task kind {kind!r} has no protocol presets, got {name!r}; "
                              "remove the key")
        return None, settings
    chosen = name if name is not None else default
    if chosen not in table:
        source = "" if name is not None else " (the config's protocol, which this task inherits)"
        raise ConfigError(f"{where}.protocol: expected one of {', '.join(map(repr, table))} for task kind "
                          f"{kind!r}, got {chosen!r}{source}")
    return chosen, {**copy.deepcopy(table[chosen]), **settings}


def check_default(name: Any, where: str = "protocol") -> str:
    """The config's run-wide protocol, checked."""
    if name not in PROTOCOLS:
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, PROTOCOLS))}, got {name!r}")
    return name


# ------------------------------------------------------------------------- item lists


def item_list(kind: str, name: str) -> dict[str, Any]:
    """A shipped item list: {'ids': [...], 'source': ..., ...} from cqd_mpi/tasks/items/<kind>-<name>.json."""
    return copy.deepcopy(_read_item_list(kind, name))


@functools.cache
def _read_item_list(kind: str, name: str) -> dict[str, Any]:
    path = ITEMS_DIR / f"{kind}-{name}.json"
    if not path.is_file():
        known = sorted(p.stem.split("-", 1)[1] for p in ITEMS_DIR.glob(f"{kind}-*.json"))
        raise ConfigError(f"item list {name!r} of task kind {kind!r}: expected one of "
                          f"{', '.join(map(repr, known)) or 'none'}, got {name!r}")
    listing = json.loads(path.read_text(encoding="utf-8"))
    listing["ids"] = [str(i) for i in listing["ids"]]
    return listing


def list_data_mismatch(kind: str, name: str, path: Path) -> str | None:
    """Why `path` may not be the file a shipped list's ids index (its ids are positions), or None."""
    import hashlib

    known = item_list(kind, name).get("data_sha256")
    if not known:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest in known:
        return None
    return (f"the ids of item list {name!r} are positions in {' or '.join(known.values())}, but {path} "
            f"(sha256 {digest[:12]}...) is neither; check that it holds those entries in that order")


def item_ids(kind: str, value: list[str] | str | None, where: str) -> list[str] | None:
    """A task's `item_ids` setting as ids: a list as given, a shipped list's name looked up, None as None."""
    if value is None or isinstance(value, list):
        return value
    try:
        return list(item_list(kind, value)["ids"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
