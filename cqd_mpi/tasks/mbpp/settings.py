"""`settings:` of an MBPP+ task; its defaults are the `paper` preset's (cqd_mpi.tasks.protocols)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cqd_mpi.errors import ConfigError
from cqd_mpi.tasks import protocols

INSTRUCTION_PREFIX = protocols.EVALPLUS_INSTRUCTION_PREFIX
RESPONSE_PREFIX = protocols.EVALPLUS_RESPONSE_PREFIX
SYSTEM_MESSAGE = protocols.AUTHORS_SYSTEM_MESSAGE


_DEFAULT = protocols.MBPP[protocols.DEFAULT]

HUMANEVAL_PLUS_VERSION = "v0.1.10"
"""The HumanEvalPlus release evalplus 0.3.1 loads (evalplus/data/humaneval.py:14)."""


@dataclasses.dataclass
class Settings:
    """`settings:` of an MBPP+ task in the config; the defaults are the `paper` preset's.

    prompt_format: 'instruction-response' (the authors' format, rendered by the task and sent
    through generate), 'chat' (the engine's chat template, continued from `response_prefix`)
    or 'completion' (base models: the raw prompt). instruction: 'assertion' (the authors': the
    problem text and its first assert) or 'evalplus' (instruction_prefix and the prompt in a
    fence). response_prefix: the text right after the response marker ('instruction-response')
    or the assistant turn to continue ('chat'). stop: null for evalplus's stop strings of the
    prompt format. sanitizer: 'authors' (their text sanitizer) or 'evalplus' (evalplus's
    codegen and tree-sitter sanitize). tests: 'base' or 'base+plus' (evalplus's MBPP+). judge:
    whose rules compare an output with the expected one: 'evalplus-1895d2f6' (the commit the
    authors pin: equality, then numpy's allclose) or 'evalplus-0.3.1' (its untrusted_check: set
    equality for eight problems, two more oracles, type checks). judge_seconds: the time to
    decode and check one output. dataset: 'mbpp' (MbppPlus) or 'humaneval' (HumanEvalPlus,
    whose release `humaneval_version` names for the default path; its prompts carry no assert,
    so it takes instruction 'evalplus').
    """

    dataset: Literal["mbpp", "humaneval"] = "mbpp"
    humaneval_version: str = HUMANEVAL_PLUS_VERSION
    task_ids: list[str] | None = None
    version: str = _DEFAULT["version"]
    prompt_format: Literal["instruction-response", "chat", "completion"] = _DEFAULT["prompt_format"]
    system_message: str | None = _DEFAULT["system_message"]
    instruction: Literal["assertion", "evalplus"] = _DEFAULT["instruction"]
    instruction_prefix: str = INSTRUCTION_PREFIX
    response_prefix: str = _DEFAULT["response_prefix"]
    stop: list[str] | None = dataclasses.field(default_factory=lambda: list(_DEFAULT["stop"]))
    max_new_tokens: int = _DEFAULT["max_new_tokens"]
    sanitizer: Literal["authors", "evalplus"] = _DEFAULT["sanitizer"]
    tests: Literal["base", "base+plus"] = _DEFAULT["tests"]
    judge: Literal["evalplus-1895d2f6", "evalplus-0.3.1"] = _DEFAULT["judge"]
    sandbox: Literal["auto", "bwrap", "unshare"] = "auto"
    timeout_seconds: float | None = _DEFAULT["timeout_seconds"]
    startup_seconds: float = 5.0
    min_time_limit: float = _DEFAULT["min_time_limit"]
    gt_time_limit_factor: float = _DEFAULT["gt_time_limit_factor"]
    judge_seconds: float = 2.0
    memory_mb: int = _DEFAULT["memory_mb"]
    max_processes: int = 16
    parallel: int = 2

    def validate(self, where: str) -> None:
        positive = ("max_new_tokens", "startup_seconds", "min_time_limit",
                    "gt_time_limit_factor", "judge_seconds", "memory_mb", "max_processes", "parallel")
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{where}.{name}: expected a number > 0, got {value!r}")
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise ConfigError(f"{where}.timeout_seconds: expected a number > 0 or null, got {self.timeout_seconds!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"{where}.memory_mb: expected at least 64 (the interpreter needs it), got {self.memory_mb}")
        if self.task_ids is not None and not self.task_ids:
            raise ConfigError(f"{where}.task_ids: expected a non-empty list of task ids or null, got []")
        if self.dataset == "humaneval" and self.instruction == "assertion":
            raise ConfigError(f"{where}.instruction: HumanEval+ prompts have no assert to cut the authors' "
                              "instruction from; expected 'evalplus' with dataset 'humaneval', got 'assertion'")
        if self.stop is not None and not all(self.stop):
            raise ConfigError(f"{where}.stop: expected non-empty strings or null, got {self.stop!r}")
