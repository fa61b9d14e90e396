"""The DB task (`kind: dbbench`): its items, its server, and the episodes it plays; see the
package docstring for the protocol and its sources."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from cqd_mpi.engines.base import TextGeneration
from cqd_mpi.errors import TaskError
from cqd_mpi.sandboxes.mysql import (
    MySQLServer,
    StatementLimits,
    open_server,
)
from cqd_mpi.tasks import multiturn, protocols
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task
from cqd_mpi.tasks.dbbench.doctor import server_status
from cqd_mpi.tasks.dbbench.episode import (
    Episode,
    Respond,
    reference_reply,
)
from cqd_mpi.tasks.dbbench.items import Item, load_items
from cqd_mpi.tasks.dbbench.scoring import category_accuracy
from cqd_mpi.tasks.dbbench.settings import Settings

log = logging.getLogger("cqd_mpi.tasks.dbbench")


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
