"""The OS task (`kind: os`): its items, its environments' back-ends, and the episodes it plays;
see the package docstring for the protocol and its sources."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cqd_mpi.engines.base import TextGeneration
from cqd_mpi.errors import TaskError
from cqd_mpi.tasks import multiturn, protocols
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task
from cqd_mpi.tasks.os_interaction.doctor import environment_status
from cqd_mpi.tasks.os_interaction.episode import (
    OSEpisode,
    reference_reply,
)
from cqd_mpi.tasks.os_interaction.items import (
    DEFAULT_IMAGE,
    Item,
    from_agentbench_id,
    load_items,
)
from cqd_mpi.tasks.os_interaction.settings import Settings


class OSInteractionTask(Task):
    """AgentBench's OS interaction; see the module docstring for the protocol and its sources."""

    kind = "os"
    Settings = Settings
    presets = protocols.OS

    def __init__(self, *, name, data, settings, context):
        super().__init__(name=name, data=data, settings=settings or Settings(), context=context)
        self._items: dict[str, Item] | None = None
        self._backend_lock = threading.Lock()
        self._rootfs: dict[str, Path] = {}
        self._client = None
        self._pristine: dict[str, Any] = {}

    # ------------------------------------------------------------------ data

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.context.config_dir) / path

    def data_path(self) -> Path:
        if not self.data:
            raise TaskError(f"task {self.name!r}: give `data:` AgentBench's data/os_interaction dir or one of "
                            "its problem files (e.g. data/os_interaction/data/dev.json)")
        return self._path(self.data)

    @property
    def items(self) -> dict[str, Item]:
        if self._items is None:
            scripts = self._path(self.settings.scripts) if self.settings.scripts else None
            items = {item.item_id: item for item in load_items(self.data_path(), scripts,
                                                               include_dev=self.settings.include_dev)}
            wanted = protocols.item_ids(self.kind, self.settings.item_ids, f"task {self.name!r}: settings.item_ids")
            if wanted is not None:
                wanted = [from_agentbench_id(i) for i in wanted]
                unknown = [i for i in wanted if i not in items]
                if unknown:
                    raise TaskError(f"task {self.name!r}: settings.item_ids names {', '.join(map(repr, unknown))}, "
                                    f"which {self.data_path()} does not have (ids look like {next(iter(items))!r})")
                items = {i: items[i] for i in items if i in set(wanted)}
            for item in items.values():
                self.settings.environment.image_for(item.image)
            self._items = items
        return self._items

    def item_seconds(self, item_id: str) -> float:
        """Each pass: the environment's budget, its last command and its checks' script."""
        env = self.settings.environment
        return self.settings.repeats * (env.item_seconds + env.command_seconds + env.script_seconds)

    def item_ids(self) -> list[str]:
        return list(self.items)

    def _item(self, item_id: str) -> Item:
        try:
            return self.items[item_id]
        except KeyError:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}") from None

    # ---------------------------------------------------------- environments

    def open_environment(self, item: Item):
        """A fresh environment for one pass of an item, on the configured back-end."""
        environment = self.settings.environment
        source = environment.image_for(item.image)
        limits = environment.limits()
        if environment.backend == "bwrap":
            from cqd_mpi.sandboxes.osenv_bwrap import BwrapEnvironment

            return BwrapEnvironment(rootfs=self._unpacked(source), image=item.image, limits=limits)
        from cqd_mpi.sandboxes.osenv_docker import DockerEnvironment

        client, pristine = self._docker(source)
        return DockerEnvironment(client=client, image=item.image, tag=source, limits=limits, pristine=pristine)

    def _unpacked(self, source: str) -> Path:
        from cqd_mpi.sandboxes.osenv_bwrap import default_rootfs_cache, ensure_rootfs

        with self._backend_lock:
            if source not in self._rootfs:
                cache = self.settings.environment.rootfs_cache
                self._rootfs[source] = ensure_rootfs(self._path(source),
                                                     self._path(cache) if cache else default_rootfs_cache())
            return self._rootfs[source]

    def _docker(self, tag: str):
        from cqd_mpi.sandboxes import containers
        from cqd_mpi.sandboxes.osenv_docker import BUILD_HINT, FEATURE, PURPOSE, Pristine

        with self._backend_lock:
            if self._client is None:
                self._client = containers.docker_client(self.settings.environment.docker_host, feature=FEATURE)
                containers.reap_orphans(self._client, PURPOSE)
            if tag not in self._pristine:
                containers.ensure_image(self._client, tag, feature=FEATURE, build_hint=BUILD_HINT)
                self._pristine[tag] = Pristine(self._client, tag)
            return self._client, self._pristine[tag]

    # -------------------------------------------------------------- protocol

    def run_episodes(self, item_ids: Sequence[str], respond: multiturn.Respond, *,
                     repeats: int | None = None) -> list[ItemResult]:
        """Play `repeats` passes of each item (cqd_mpi.tasks.multiturn.play) and score each item by
        the mean of its passes."""
        repeats = self.settings.repeats if repeats is None else repeats
        items = [self._item(i) for i in item_ids]
        episodes = [OSEpisode(item=item, task=self) for item in items for _ in range(repeats)]
        results = multiturn.play(episodes, respond, parallel=self.settings.parallel, where=f"task {self.name!r}")
        combined = []
        for index, item in enumerate(items):
            passes = results[index * repeats:(index + 1) * repeats]
            if repeats == 1:
                combined.append(passes[0])
                continue
            score = sum(r.score for r in passes) / repeats
            error = next((r.error for r in passes if r.error is not None), None) if score < 1.0 else None
            combined.append(ItemResult(item_id=item.item_id, score=score, error=error,
                                       seconds=sum(r.seconds for r in passes),
                                       detail={"scores": [r.score for r in passes],
                                               "passes": [r.detail for r in passes]}))
        return combined

    def evaluate(self, model: TextGeneration, item_ids: Sequence[str]) -> list[ItemResult]:
        settings = self.settings

        def respond(episodes):
            return list(model.chat([e.history for e in episodes], max_new_tokens=settings.max_new_tokens,
                                   stop=list(settings.stop)))

        return self.run_episodes(item_ids, respond)

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """The harness ceiling (check-tasks): each item's example (check items) or a shell echo of
        its answer (match items) runs in the agent's shell, and its output is the answer."""
        return self.run_episodes(item_ids, lambda episodes: [reference_reply(e) for e in episodes], repeats=1)

    def check_backends(self) -> list[BackendStatus]:
        statuses = []
        try:
            path = self.data_path()
            statuses.append(BackendStatus("os data", True, f"{path}: {len(self.items)} items"))
            images = sorted({item.image for item in self.items.values()})
        except Exception as exc:
            statuses.append(BackendStatus("os data", False, str(exc)))
            images = [DEFAULT_IMAGE]
        statuses += environment_status(self.settings.environment, images, self._path)
        return statuses

    def close(self) -> None:
        with self._backend_lock:
            pristine, self._pristine = self._pristine, {}
            client, self._client = self._client, None
        for entry in pristine.values():
            entry.close()
        if client is not None:
            client.close()
