"""`settings:` of an os task, and `settings.environment`: the back-end and limits of each
item's environment and where its images are."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.sandboxes.osenv import EnvLimits
from cqd_mpi.schema import parse_size


def default_images() -> dict[str, dict[str, str]]:
    """Where each back-end finds AgentBench's images, as env/os-image.sh leaves them."""
    cache = os.environ.get("CQD_CACHE_DIR", "/var/cache/cqd_mpi")
    return {
        "bwrap": {name: f"{cache}/os-{name}-rootfs-bookworm.tar" for name in ("default", "packages")},
        "docker": {name: f"localhost/cqd_mpi-os-{name}:latest" for name in ("default", "packages")},
    }


@dataclasses.dataclass
class EnvironmentSettings:
    """`settings.environment` of an os task: the back-end and the limits of each item's environment.

    images: AgentBench image name (`local-os/default`, or `default`) -> a rootfs tarball or
    directory (bwrap) or an image tag (docker); env/os-image.sh's by default. rootfs_cache:
    where bwrap unpacks tarballs, once per node (default ~/.cache/cqd_mpi/os-rootfs; for root
    $CQD_CACHE_DIR/os-rootfs, default /var/cache/cqd_mpi/os-rootfs).
    docker_host: default $DOCKER_HOST. Sizes are bytes or strings such as '512MiB'.
    """

    backend: Literal["bwrap", "docker"] = "bwrap"
    images: dict[str, str] = dataclasses.field(default_factory=dict)
    rootfs_cache: str | None = None
    docker_host: str | None = None
    command_seconds: float = 30.0
    script_seconds: float = 60.0
    item_seconds: float = 600.0
    memory: int | str = "1GiB"
    processes: int = 256
    disk: int | str = "512MiB"
    inodes: int = 65536
    output: int | str = "1MiB"

    def validate(self, where: str) -> None:
        for name in ("memory", "disk", "output"):
            parse_size(getattr(self, name), f"{where}.{name}", minimum=1)
        for name in ("command_seconds", "script_seconds", "item_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}: expected a number > 0, got {getattr(self, name)!r}")
        for name in ("processes", "inodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")

    def limits(self) -> EnvLimits:
        return EnvLimits(command_seconds=self.command_seconds, script_seconds=self.script_seconds,
                         memory_bytes=parse_size(self.memory), processes=self.processes,
                         disk_bytes=parse_size(self.disk), inodes=self.inodes, output_bytes=parse_size(self.output))

    def image_for(self, name: str) -> str:
        """The rootfs or tag configured for an item's image; TaskError naming the setting when none is."""
        short = name.removeprefix("local-os/")
        images = {**default_images()[self.backend], **self.images}
        for key in (name, short):
            if key in images:
                return images[key]
        raise TaskError(f"settings.environment.images has no {self.backend} image for {name!r} "
                        f"(configured: {', '.join(sorted(images))})")


@dataclasses.dataclass
class Settings:
    """`settings:` of an os task in the config.

    max_rounds: replies per item (the paper: 5; AgentBench's config: 8). max_new_tokens: per
    reply. repeats: passes per item, scored by their mean (the CycleQD authors used 5).
    parallel: environments set up, run and checked at once per worker. judge_unfinished:
    judge an episode that ended without finish/answer with an empty answer (the authors'
    code) instead of failing it (AgentBench). scripts: the scripts dir of a single data file
    (default: AgentBench's layout, see the module docstring). item_ids: a subset of items, by
    this task's ids or AgentBench's sample ids, or the name of a list shipped with the package
    (cqd_mpi/tasks/items/os-<name>.json; the `paper` protocol's 110 items are `cycleqd`).
    include_dev: with a data dir, also its data/dev.json (the `paper` items are standard + dev).
    init_failure: an init script that exits non-zero 'fail's the item (AgentBench) or is
    'ignore'd and the episode goes on (the authors' code).
    turn_seconds: the authors' per-turn wait: a command still running after it is interrupted
    and the episode is judged with an empty answer (status `turn-limit`); null (AgentBench): a
    command runs up to `environment.command_seconds` and the episode goes on.
    observation: what the agent reads of a command's output, before the 800-character cut:
    'cleaned' (AgentBench: escape sequences and BELs removed) or 'raw' (the authors' code: the
    terminal's text as read, escape sequences and carriage returns included, then bash's prompt
    as their terminal renders it: protocol.terminal_prompt).
    """

    environment: EnvironmentSettings = dataclasses.field(default_factory=EnvironmentSettings)
    max_rounds: int = 5
    max_new_tokens: int = 512
    stop: list[str] = dataclasses.field(default_factory=list)
    repeats: int = 1
    parallel: int = 4
    judge_unfinished: bool = False
    init_failure: Literal["fail", "ignore"] = "fail"
    turn_seconds: float | None = None
    observation: Literal["cleaned", "raw"] = "cleaned"
    scripts: str | None = None
    item_ids: list[str] | str | None = None
    include_dev: bool = False

    def validate(self, where: str) -> None:
        for name in ("max_rounds", "max_new_tokens", "repeats", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.turn_seconds is not None and not self.turn_seconds > 0:
            raise ConfigError(f"{where}.turn_seconds: expected a number > 0 or null, got {self.turn_seconds!r}")
        if isinstance(self.item_ids, list) and not self.item_ids:
            raise ConfigError(f"{where}.item_ids: expected a non-empty list of item ids or null, got []")
