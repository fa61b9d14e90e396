"""One dbbench item's conversation and database (`Episode`), and the oracle reply that
`check-tasks` plays."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

from cqd_mpi.errors import BackendUnavailable
from cqd_mpi.sandboxes.mysql import (
    ItemDatabase,
    format_error,
    pymysql_module,
    unique_name,
)
from cqd_mpi.tasks import multiturn
from cqd_mpi.tasks.base import ItemResult, Task
from cqd_mpi.tasks.dbbench.items import Item
from cqd_mpi.tasks.dbbench.protocol import (
    ACKNOWLEDGEMENT,
    ACTION,
    FINAL_ANSWER,
    INSTRUCTION,
    SQL_BLOCK,
)
from cqd_mpi.tasks.dbbench.scoring import is_correct

STATUS_ERRORS = {"completed": "wrong-answer", "validation-failed": "parse", "round-limit": "round-limit"}

EXCERPT_CHARS = 2000


class Episode(multiturn.Episode):
    """One item's conversation, following AgentBench v0.2's start_sample loop, and its database.

    Built without a task it only plays the protocol (take_reply / take_observation); with one,
    `play` gives it a database on the task's (a DBBenchTask's) server.
    """

    def __init__(self, *, item: Item, max_rounds: int, operation_without_sql: str = "fail",
                 task: Task | None = None, server_down: threading.Event | None = None):
        super().__init__(item_id=item.item_id, history=[
            {"role": "user", "content": INSTRUCTION},
            {"role": "assistant", "content": ACKNOWLEDGEMENT},
            {"role": "user", "content": item.question},
        ])
        self.item = item
        self.max_rounds = max_rounds
        self.operation_without_sql = operation_without_sql
        self.rounds = 0
        self.answer = ""
        self.statements: list[str] = []
        self.database: ItemDatabase | None = None
        self.message = ""
        self._task = task
        self._server_down = server_down or threading.Event()

    def take_reply(self, reply: str) -> str | None:
        """Record the agent's reply; the SQL to execute, or None when the episode has ended."""
        self.history.append({"role": "assistant", "content": reply})
        action = ACTION.search(reply)
        if action and action.group(1) == "Operation" and self.rounds < self.max_rounds:
            block = SQL_BLOCK.search(reply)
            if block:
                sql = block.group(1).strip().replace("\n", " ")
                self.statements.append(sql)
                return sql
            if self.operation_without_sql == "fail":
                self.status = "validation-failed"
                return None
        final = FINAL_ANSWER.search(reply)
        if final:
            self.answer = final.group(1)
            self.status = "completed"
        else:
            self.status = "validation-failed"
        if self.rounds >= self.max_rounds and not self.answer:
            self.status = "round-limit"
        return None

    def take_observation(self, text: str) -> None:
        super().take_observation(text)
        self.rounds += 1

    # --------------------------------------------------------- the database

    def set_up(self) -> None:
        task, item = self._task, self.item
        self.database = ItemDatabase.create(
            task.server, name=unique_name(rank=task.context.rank, item=item.item_id), alias=item.table.name,
            limits=task.statement_limits())
        try:
            self.database.load(item.table)
        except pymysql_module().MySQLError as exc:
            self.message = (f"the server refused the item's table ({self.database.shown(format_error(exc))}); "
                            "the item goes on without it, as in AgentBench")

    def act(self, sql: str) -> str:
        return self.database.execute(sql)

    def score(self) -> ItemResult:
        if self.item.modifies and self.database is not None:
            self.answer = self.database.table_hash(self.item.table)
        return self.result()

    def tear_down(self) -> None:
        if self.database is None or self._server_down.is_set():
            return
        try:
            self.database.drop()
        except BackendUnavailable:
            self._server_down.set()
            raise

    def result(self) -> ItemResult:
        item = self.item
        correct = is_correct(item, self.answer)
        detail: dict[str, Any] = {
            "type": item.type, "category": item.category, "status": self.status, "rounds": self.rounds,
            "answer": self.answer[:EXCERPT_CHARS], "sql": [s[:EXCERPT_CHARS] for s in self.statements],
            "last_reply": self.history[-1]["content"][:EXCERPT_CHARS] if len(self.history) > 3 else "",
        }
        if self.message:
            detail["message"] = self.message[:EXCERPT_CHARS]
        return ItemResult(item_id=item.item_id, score=1.0 if correct else 0.0,
                          error=None if correct else STATUS_ERRORS[self.status or "completed"],
                          seconds=time.monotonic() - self.started, detail=detail)

    def failed_result(self) -> ItemResult:
        result = super().failed_result()
        return dataclasses.replace(result, detail={"type": self.item.type, "category": self.item.category,
                                                   "rounds": self.rounds, **result.detail})


Respond = multiturn.Respond


def reference_reply(episode: Episode) -> str:
    """The oracle's next reply: execute the label's statements one per round, or answer the label."""
    item = episode.item
    if item.modifies:
        statements = [str(s) for s in item.label or ()]
        if episode.rounds < min(len(statements), episode.max_rounds):
            return f"Action: Operation\n```sql\n{statements[episode.rounds]}\n```"
        return "Action: Answer\nFinal Answer: []"
    return "Action: Answer\nFinal Answer: " + json.dumps(list(item.label or ()), ensure_ascii=False)
