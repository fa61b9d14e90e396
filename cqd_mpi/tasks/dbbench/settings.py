"""`settings:` of a dbbench task."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cqd_mpi.errors import ConfigError
from cqd_mpi.sandboxes.mysql import (
    RESULT_CHARS,
    ServerSettings,
)


@dataclasses.dataclass
class Settings:
    """`settings:` of a dbbench task in the config.

    max_rounds: SQL executions allowed before the final answer (AgentBench v0.2's code default, 5;
    its dbbench config runs 15).
    max_new_tokens: per reply (AgentBench's agents use 512, greedy).
    statement_seconds: time limit of one statement. parallel: threads that set up databases
    and run one round's statements of a batch. item_ids: a subset of the file's items, or the
    name of a list shipped with the package (cqd_mpi/tasks/items/dbbench-<name>.json).
    operation_without_sql: an Operation reply without a ```sql block fails the item ('fail',
    AgentBench) or is read for its Final Answer ('read-answer', the CycleQD authors).
    metric: 'category-mean' (AgentBench's overall_cat_accuracy) or 'pooled' (the authors'
    accuracy over all items).
    """

    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    max_rounds: int = 5
    max_new_tokens: int = 512
    stop: list[str] = dataclasses.field(default_factory=list)
    statement_seconds: float = 10.0
    result_chars: int = RESULT_CHARS
    parallel: int = 4
    item_ids: list[str] | str | None = None
    operation_without_sql: Literal["fail", "read-answer"] = "fail"
    metric: Literal["category-mean", "pooled"] = "category-mean"

    def validate(self, where: str) -> None:
        for name in ("max_rounds", "max_new_tokens", "result_chars", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not self.statement_seconds > 0:
            raise ConfigError(f"{where}.statement_seconds: expected a number > 0, got {self.statement_seconds!r}")
        if self.item_ids is not None and not self.item_ids:
            raise ConfigError(f"{where}.item_ids: expected a non-empty list of item ids or null, got []")
