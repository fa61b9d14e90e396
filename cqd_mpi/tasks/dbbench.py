"""AgentBench's DB task (dbbench): multi-turn SQL against a real MySQL-compatible server.

The protocol follows AgentBench v0.2 (THUDM/AgentBench at 41e6807,
src/server/tasks/dbbench/__init__.py), the version the CycleQD paper evaluates with (0-shot,
up to 5 rounds):
- the conversation opens with its instruction prompt as a user turn, "Ok." as the agent's
  turn, then the item's `description` and `add_description`;
- a reply whose `Action: ` line says `Operation` must hold a ```sql block; its first block is
  executed (newlines made spaces) and the raw result, cut at 800 characters, is the next user
  turn. After `max_rounds` executions, or on any other action, the reply must hold a line
  `Final Answer: ...`; a reply that fits neither pattern ends the item (validation failure);
- SELECT-style items compare that answer with the label (AgentBench's calculate_overall:
  float equality for single values, set equality otherwise); INSERT/UPDATE/DELETE items ignore
  the answer and compare AgentBench's row-hash MD5 of the table with `answer_md5`;
- the metric is AgentBench's `overall_cat_accuracy`: the mean of the SELECT, INSERT and UPDATE
  categories' accuracies (SELECT holds every type other than INSERT and UPDATE).

Those are the Settings defaults (AgentBench's code defaults). A config always goes through a
protocol (cqd_mpi.tasks.protocols.DBBENCH): `paper` (the CycleQD authors' 341 items, 5 rounds,
an Operation reply without SQL read for its answer, pooled accuracy) or `reference`
(AgentBench v0.2's configs: 15 rounds); docs/protocols.md has each point and its source.

Deliberate differences, for isolation: AgentBench runs every item as root in a database named
after its table and lets a statement string hold several statements; here each item has its
own database and user (cqd_mpi.sandboxes.mysql), several statements are refused, and
statements have a time limit. AgentBench eval()s the answer text; here it is read with
ast.literal_eval, which accepts the same literals and never runs model output.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cqd_mpi.engines.base import TextGeneration
from cqd_mpi.errors import BackendUnavailable, ConfigError, TaskError
from cqd_mpi.sandboxes import containers
from cqd_mpi.sandboxes.mysql import (
    RESULT_CHARS,
    Address,
    ExternalServer,
    ItemDatabase,
    MySQLServer,
    ServerSettings,
    StatementLimits,
    Table,
    find_server_binary,
    format_error,
    open_server,
    parse_dsn,
    pymysql_module,
    unique_name,
)
from cqd_mpi.tasks import multiturn, protocols
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task

log = logging.getLogger("cqd_mpi.tasks.dbbench")

INSTRUCTION = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""
"""AgentBench v0.2's `big_prompt`, verbatim (leading and trailing newline included)."""

ACKNOWLEDGEMENT = "Ok."

ACTION = re.compile(r"Action: (.*?)\n")
SQL_BLOCK = re.compile(r"```sql\n([\s\S]*?)\n```")
FINAL_ANSWER = re.compile(r"\nFinal Answer:(.*)")

MODIFYING_TYPES = ("INSERT", "DELETE", "UPDATE")
CATEGORIES = ("SELECT", "INSERT", "UPDATE")

STATUS_ERRORS = {"completed": "wrong-answer", "validation-failed": "parse", "round-limit": "round-limit"}

EXCERPT_CHARS = 2000


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


@dataclasses.dataclass(frozen=True)
class Item:
    """One dbbench entry: its question, its table, and what a correct run produces."""

    item_id: str
    type: str
    description: str
    add_description: str
    table: Table
    label: tuple[Any, ...] | None
    answer_md5: str | None

    @property
    def modifies(self) -> bool:
        return self.type in MODIFYING_TYPES

    @property
    def category(self) -> str:
        """AgentBench's category: INSERT, UPDATE, or SELECT for every other type (DELETE included)."""
        return self.type if self.type in ("INSERT", "UPDATE") else "SELECT"

    @property
    def question(self) -> str:
        return self.description + "\n" + self.add_description


def _cell(value: Any, where: str) -> Any:
    """A table cell bound as AgentBench's client binds it (numbers as their Python text, None as NULL)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return str(value)
    raise TaskError(f"{where}: expected a string, number or null, got {type(value).__name__} {value!r:.60}")


def parse_item(entry: Any, *, item_id: str, where: str) -> Item:
    """Check one jsonl entry and build its Item; errors name the entry and the key."""

    def need(mapping: Any, key: str, kind: type | tuple[type, ...], path: str) -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise TaskError(f"{where}: missing key {path!r}")
        value = mapping[key]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TaskError(f"{where}: key {path!r} should be {names}, got {type(value).__name__} {value!r:.60}")
        return value

    if not isinstance(entry, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    types = need(entry, "type", list, "type")
    if not types or not isinstance(types[0], str):
        raise TaskError(f"{where}: key 'type' should be a list starting with a type name, got {types!r:.60}")
    table = need(entry, "table", dict, "table")
    info = need(table, "table_info", dict, "table.table_info")
    columns = need(info, "columns", list, "table.table_info.columns")
    names = []
    for index, column in enumerate(columns):
        names.append(need(column, "name", str, f"table.table_info.columns[{index}].name"))
    if not names:
        raise TaskError(f"{where}: key 'table.table_info.columns' is empty")
    rows = []
    for index, row in enumerate(need(info, "rows", list, "table.table_info.rows")):
        if not isinstance(row, list) or len(row) != len(names):
            raise TaskError(f"{where}: table.table_info.rows[{index}] should be a list of {len(names)} cells "
                            f"(one per column), got {row!r:.60}")
        rows.append(tuple(_cell(v, f"{where}: table.table_info.rows[{index}]") for v in row))
    kind = types[0]
    label = entry.get("label")
    if label is not None and not isinstance(label, list):
        raise TaskError(f"{where}: key 'label' should be list, got {type(label).__name__} {label!r:.60}")
    answer_md5 = None
    if kind in MODIFYING_TYPES:
        answer_md5 = need(entry, "answer_md5", str, "answer_md5")
    elif label is None:
        raise TaskError(f"{where}: missing key 'label' (the answer list of a {kind} item)")
    return Item(
        item_id=item_id,
        type=kind,
        description=need(entry, "description", str, "description"),
        add_description=need(entry, "add_description", str, "add_description"),
        table=Table(name=need(table, "table_name", str, "table.table_name"), columns=tuple(names), rows=tuple(rows)),
        label=None if label is None else tuple(label),
        answer_md5=answer_md5,
    )


def load_items(path: Path) -> list[Item]:
    """The items of an AgentBench dbbench file (jsonl, or a JSON list), ids '0', '1', ... in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"dbbench data {path}: cannot read it ({exc})") from exc
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise TaskError(f"dbbench data {path}: not valid JSON ({exc})") from exc
        if not isinstance(entries, list):
            raise TaskError(f"dbbench data {path}: expected a JSON list of entries, got {type(entries).__name__}")
        located = [(f"dbbench data {path} entry {i}", e) for i, e in enumerate(entries)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"dbbench data {path} line {number}", json.loads(line)))
            except ValueError as exc:
                raise TaskError(f"dbbench data {path} line {number}: not valid JSON ({exc})") from exc
    if not located:
        raise TaskError(f"dbbench data {path}: the file holds no entries")
    return [parse_item(entry, item_id=str(i), where=where) for i, (where, entry) in enumerate(located)]


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


class Episode(multiturn.Episode):
    """One item's conversation, following AgentBench v0.2's start_sample loop, and its database.

    Built without a task it only plays the protocol (take_reply / take_observation); with one,
    `play` gives it a database on the task's server.
    """

    def __init__(self, *, item: Item, max_rounds: int, operation_without_sql: str = "fail",
                 task: DBBenchTask | None = None, server_down: threading.Event | None = None):
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


class DBBenchTask(Task):
    """AgentBench's DB task; see the module docstring for the protocol and its sources."""

    kind = "dbbench"
    Settings = Settings
    presets = protocols.DBBENCH

    def __init__(self, *, name, data, settings, context):
        super().__init__(name=name, data=data, settings=settings or Settings(), context=context)
        self._items: dict[str, Item] | None = None
        self._server: MySQLServer | None = None
        self._server_lock = threading.Lock()

    # ------------------------------------------------------------------ data

    def data_path(self) -> Path:
        if not self.data:
            raise TaskError(
                f"task {self.name!r}: give `data:` the path of an AgentBench dbbench jsonl "
                "(e.g. AgentBench's data/dbbench/dev.jsonl)"
            )
        path = Path(self.data).expanduser()
        return path if path.is_absolute() else Path(self.context.config_dir) / path

    @property
    def items(self) -> dict[str, Item]:
        if self._items is None:
            path = self.data_path()
            if not path.is_file():
                raise TaskError(f"task {self.name!r}: dbbench data file {path} does not exist")
            items = {item.item_id: item for item in load_items(path)}
            wanted = protocols.item_ids(self.kind, self.settings.item_ids, f"task {self.name!r}: settings.item_ids")
            if isinstance(self.settings.item_ids, str):
                mismatch = protocols.list_data_mismatch(self.kind, self.settings.item_ids, path)
                if mismatch:
                    log.warning("task %s: %s", self.name, mismatch)
            if wanted is not None:
                unknown = [i for i in wanted if i not in items]
                if unknown:
                    shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                    raise TaskError(f"task {self.name!r}: settings.item_ids names {shown}, "
                                    f"but {path} has ids 0..{len(items) - 1}")
                items = {i: items[i] for i in sorted(set(wanted), key=int)}
            self._items = items
        return self._items

    def item_seconds(self, item_id: str) -> float:
        """Every round's statement, and the item's set-up and check, at the statement limit."""
        return (self.settings.max_rounds + 2) * self.settings.statement_seconds

    def item_ids(self) -> list[str]:
        return list(self.items)

    def _item(self, item_id: str) -> Item:
        try:
            return self.items[item_id]
        except KeyError:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}") from None

    # ---------------------------------------------------------------- server

    @property
    def server(self) -> MySQLServer:
        """The task's server, reached or started on first use and kept until close()."""
        with self._server_lock:
            if self._server is None:
                self._server = open_server(self.settings.server)
            return self._server

    def statement_limits(self) -> StatementLimits:
        return StatementLimits(statement_seconds=self.settings.statement_seconds, result_chars=self.settings.result_chars)

    def run_episodes(self, item_ids: Sequence[str], respond: Respond) -> list[ItemResult]:
        """Play the items round by round (cqd_mpi.tasks.multiturn.play): one `respond` call per
        round for every running item, then that round's statements on the items' databases in
        parallel. An item whose set-up, statement or scoring raises scores 0 with that error;
        a server that is down ends the batch with BackendUnavailable."""
        server_down = threading.Event()
        episodes = [Episode(item=self._item(i), max_rounds=self.settings.max_rounds,
                            operation_without_sql=self.settings.operation_without_sql, task=self,
                            server_down=server_down)
                    for i in item_ids]
        if not episodes:
            return []
        self.server  # noqa: B018 (reach or start it here, not in a pool thread, and fail before any item)
        return multiturn.play(episodes, respond, parallel=self.settings.parallel, where=f"task {self.name!r}")

    # -------------------------------------------------------------- protocol

    def evaluate(self, model: TextGeneration, item_ids: Sequence[str]) -> list[ItemResult]:
        settings = self.settings

        def respond(episodes: Sequence[Episode]) -> list[str]:
            return list(model.chat([e.history for e in episodes], max_new_tokens=settings.max_new_tokens,
                                   stop=list(settings.stop)))

        return self.run_episodes(item_ids, respond)

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """The harness ceiling (check-tasks): modifying items execute their label statements and
        must reproduce answer_md5; the others answer with their label."""
        for item_id in item_ids:
            item = self._item(item_id)
            if item.modifies and not item.label:
                raise TaskError(f"task {self.name!r}: item {item_id} ({item.type}) has no label statements to replay")
        return self.run_episodes(item_ids, lambda episodes: [reference_reply(e) for e in episodes])

    def metric(self, results: Sequence[ItemResult]) -> float:
        """settings.metric 'category-mean': AgentBench's overall_cat_accuracy, the mean over SELECT,
        INSERT and UPDATE of each category's accuracy (a category with no items counts 0, as in
        AgentBench); 'pooled': the CycleQD authors' overall_cat_accuracy, correct items over all
        items (each item is in exactly one of the three categories)."""
        if self.settings.metric == "pooled":
            return super().metric(results)
        return category_accuracy([(self._item(r.item_id).category, r.score) for r in results])["overall"]

    def check_backends(self) -> list[BackendStatus]:
        statuses = []
        try:
            path = self.data_path()
            count = len(load_items(path))
            statuses.append(BackendStatus("dbbench data", True, f"{path}: {count} items"))
        except Exception as exc:
            statuses.append(BackendStatus("dbbench data", False, str(exc)))
        statuses.append(server_status(self.settings.server))
        return statuses

    def close(self) -> None:
        with self._server_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()


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


def server_status(settings: ServerSettings) -> BackendStatus:
    """Whether the configured MySQL back-end can be used, without starting anything. Never raises."""
    name = f"mysql ({settings.backend})"
    try:
        if settings.backend == "external":
            address = (parse_dsn(settings.dsn) if settings.dsn else
                       Address(host=settings.host, port=settings.port, user=settings.user, password=settings.password))
            with ExternalServer(address=address, attempts=1) as server:
                return BackendStatus(name, True, f"{server.version} at {address}")
        if settings.backend == "local":
            return BackendStatus(name, True, f"will start {find_server_binary(settings.binary)}")
        client = containers.docker_client(settings.docker_host, feature="The dbbench 'docker' MySQL back-end")
        with contextlib.closing(client):
            client.images.get(settings.image)
        return BackendStatus(name, True, f"image {settings.image} at {client.cqd_base_url or 'the default docker socket'}")
    except BackendUnavailable as exc:
        return BackendStatus(name, False, str(exc))
    except Exception as exc:
        return BackendStatus(name, False, f"{type(exc).__name__}: {exc}")
