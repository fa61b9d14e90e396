"""How AgentBench scores a dbbench answer, and its per-category accuracy."""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from typing import Any

from cqd_mpi.tasks.dbbench.items import Item

log = logging.getLogger("cqd_mpi.tasks.dbbench")


CATEGORIES = ("SELECT", "INSERT", "UPDATE")


def _literal(text: str) -> Any:
    return ast.literal_eval(text)


def answer_matches(answer: str, label: Sequence[Any]) -> bool:
    """AgentBench v0.2's check of a SELECT-style answer against its label (calculate_overall)."""
    try:
        values = list(_literal(answer))
    except Exception:
        values = [answer]
    if len(values) == 1 and len(label) == 1:
        try:
            return float(values[0]) == float(label[0])
        except (ValueError, TypeError, OverflowError):
            return values[0] == label[0]
    try:
        return set(label) == set(values)
    except TypeError:
        return False


def is_correct(item: Item, answer: str) -> bool:
    """Whether a run's answer (the table hash for modifying items) is right, as AgentBench scores it."""
    if item.modifies:
        return answer == item.answer_md5
    return answer_matches(answer, item.label or ())


def category_accuracy(scored: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Per-category accuracy of (category, score) pairs and their AgentBench 'overall' mean."""
    accuracy = {}
    for category in CATEGORIES:
        scores = [s for c, s in scored if c == category]
        if not scores and scored:
            log.warning("dbbench: no %s items among the %d scored; the category counts 0 (as in AgentBench)",
                        category, len(scored))
        accuracy[category] = sum(scores) / len(scores) if scores else 0.0
    accuracy["overall"] = sum(accuracy[c] for c in CATEGORIES) / len(CATEGORIES) if scored else 0.0
    return accuracy
