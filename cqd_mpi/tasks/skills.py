"""Synthetic skills for the embedded demo: exact match under greedy generation.

Each skill maps a short string to an answer: ``reverse:stone=`` -> ``enots``, ``sort:3142=``
-> ``1234``, ``shift:abz=`` -> ``bca`` (each letter one place on). Items are drawn from a
seeded generator, so every rank lists the same items; no data file is needed.

This module is also the smallest complete example of a task kind: a `Settings` dataclass
(checked by cqd_mpi.schema), `item_ids`, `evaluate`, and reference solutions for check-tasks.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from cqd_mpi.engines.base import TextGeneration
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks.base import ItemResult, Task

_SHIFTED = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a")


@dataclasses.dataclass(frozen=True)
class Skill:
    alphabet: str
    solve: Callable[[str], str]


SKILLS = {
    "reverse": Skill(string.ascii_lowercase, lambda text: text[::-1]),
    "sort": Skill(string.digits, lambda text: "".join(sorted(text))),
    "shift": Skill(string.ascii_lowercase, lambda text: text.translate(_SHIFTED)),
}


def prompt(skill: str, text: str) -> str:
    return f"{skill}:{text}="


def sample(skill: str, rng: np.random.Generator, *, min_length: int, max_length: int) -> tuple[str, str]:
    """One random (prompt, answer) pair of `skill` with an input of min_length..max_length symbols."""
    alphabet = SKILLS[skill].alphabet
    length = int(rng.integers(min_length, max_length + 1))
    text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))
    return prompt(skill, text), SKILLS[skill].solve(text)


@dataclasses.dataclass
class Settings:
    """`settings:` of a skills task: which skill, how many items, their input lengths and seed."""

    skill: str
    n_items: int = 300
    min_length: int = 3
    max_length: int = 12
    seed: int = 0
    max_new_tokens: int | None = None

    def validate(self, where: str) -> None:
        if self.skill not in SKILLS:
            raise ConfigError(f"{where}.skill: expected one of {', '.join(SKILLS)}, got {self.skill!r}")
        if self.n_items < 2:
            raise ConfigError(f"{where}.n_items: expected an integer >= 2, got {self.n_items}")
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"{where}.max_length: expected 1 <= min_length <= max_length, "
                f"got min_length={self.min_length}, max_length={self.max_length}"
            )
        symbols = len(SKILLS[self.skill].alphabet)
        inputs = sum(symbols**length for length in range(self.min_length, self.max_length + 1))
        if self.n_items > inputs // 2:
            raise ConfigError(
                f"{where}.n_items: expected at most half of the {inputs} possible inputs of "
                f"{self.min_length}..{self.max_length} symbols, got {self.n_items}; lower n_items or raise max_length"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens: expected an integer >= 1, got {self.max_new_tokens}")


def items(settings: Settings) -> dict[str, tuple[str, str]]:
    """The task's items by id: n_items distinct (prompt, answer) pairs, the same on every call."""
    settings.validate("settings")
    rng = np.random.default_rng([settings.seed, zlib.crc32(settings.skill.encode())])
    pairs: dict[str, str] = {}
    while len(pairs) < settings.n_items:
        question, answer = sample(settings.skill, rng, min_length=settings.min_length,
                                  max_length=settings.max_length)
        pairs.setdefault(question, answer)
    return {f"{settings.skill}-{i:04d}": pair for i, pair in enumerate(pairs.items())}


class Solver:
    """A perfect policy: answers every skills prompt by computing it (reference solutions)."""

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        answers = []
        for text in prompts:
            skill, _, rest = text.partition(":")
            answers.append(SKILLS[skill].solve(rest.removesuffix("="))[:max_new_tokens])
        return answers


class SkillsTask(Task):
    """Exact match of the greedy completion with the skill's answer."""

    kind = "skills"
    Settings = Settings

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._items = items(self.settings)

    def item_ids(self) -> list[str]:
        return list(self._items)

    def evaluate(self, model: TextGeneration, item_ids: Sequence[str]) -> list[ItemResult]:
        unknown = [i for i in item_ids if i not in self._items]
        if unknown:
            raise TaskError(f"task {self.name!r}: unknown item ids {unknown[:3]}")
        questions = [self._items[i][0] for i in item_ids]
        max_new_tokens = self.settings.max_new_tokens or self.settings.max_length + 1
        completions = model.generate(questions, max_new_tokens=max_new_tokens)
        results = []
        for item_id, completion in zip(item_ids, completions):
            expected = self._items[item_id][1]
            results.append(ItemResult(item_id, float(completion.strip() == expected),
                                      detail={"expected": expected, "completion": completion}))
        return results

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        return self.evaluate(Solver(), item_ids)
