"""The task protocol: a task lists its items and scores a batch of them with a live model.

A task's metric (pass@1, success rate, exact match, IoU) is the mean of its per-item scores,
each in [0, 1]. Items are scored independently of one another and of how they are batched
across workers, so a model's metric does not depend on the number of ranks.

To add a task kind: subclass Task in a new module under cqd_mpi/tasks/, give it a `kind`,
a `Settings` dataclass (its keys are the `settings:` of the task in the config, checked by
cqd_mpi.schema), the capability it calls on the live model (`requires`: text generation
unless it says otherwise), and implement `item_ids` and `evaluate`. Register the module in
cqd_mpi/tasks/__init__.py, or name it in the config as ``kind: package.module:ClassName``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from cqd_mpi.engines.base import Capability, TextGeneration
from cqd_mpi.schema import NoSettings


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One item's outcome. `error` names the failure class (timeout, sandbox, parse...) or is None."""

    item_id: str
    score: float
    error: str | None = None
    seconds: float = 0.0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What `doctor` prints for one back-end a task depends on."""

    name: str
    ok: bool
    message: str


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """Where a task instance lives: its process's rank, a private scratch dir, the run seed."""

    rank: int = 0
    world_size: int = 1
    work_dir: Path = Path(".")
    seed: int = 0
    config_dir: Path = Path(".")

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger("cqd_mpi.tasks")


class Task(abc.ABC):
    """Base class of task kinds. Subclasses set `kind` and `Settings` and implement two methods."""

    kind: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    requires: ClassVar[type[Capability]] = TextGeneration
    """The capability of the live model this task calls (engines/base.py)."""
    path_settings: ClassVar[tuple[str, ...]] = ()
    """Settings that are paths: resolved against the config file's folder when it is loaded,
    as `data` is, so the frozen config names them absolutely."""
    batch_size: int = 16

    def __init__(self, *, name: str, data: str | None, settings: Any, context: TaskContext):
        self.name = name
        self.data = data
        self.settings = settings
        self.context = context

    @abc.abstractmethod
    def item_ids(self) -> list[str]:
        """All item ids, in a fixed order that every rank reproduces."""

    @abc.abstractmethod
    def evaluate(self, model: Any, item_ids: Sequence[str]) -> list[ItemResult]:
        """Score the given items with the live model (an engine with `requires`); one result
        per id, in the same order."""

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """Score the items' reference solutions through the same harness (check-tasks)."""
        from cqd_mpi.errors import TaskError

        raise TaskError(f"task kind {self.kind!r} has no reference solutions to check")

    @classmethod
    def capabilities_needed(cls, settings: Any, *, root: Path | str = ".", where: str = "settings"
                            ) -> tuple[type[Capability], ...]:
        """The capabilities a task with these settings calls (checked when a config is loaded;
        `root` is the config's folder). `requires` unless a kind's needs depend on its settings."""
        return (cls.requires,)

    def data_digest(self) -> str:
        """A digest of the data the task scores beyond its settings (here the bytes of `data`,
        a file or a folder; "" without one), so that `evaluate` re-scores when it changes. A
        kind whose items come from elsewhere digests those."""
        return path_digest(Path(self.data).expanduser()) if self.data else ""

    def item_seconds(self, item_id: str) -> float:
        """The most time one item may spend outside the model (its sandboxes, servers,
        environments) by the task's own limits; sizes `runtime.eval_deadline: auto`."""
        return 0.0

    def metric(self, results: Sequence[ItemResult]) -> float:
        return float(sum(r.score for r in results) / len(results)) if results else 0.0

    def check_backends(self) -> list[BackendStatus]:
        """Reachability of the task's back-ends, for `doctor`. Must not raise."""
        return []

    def close(self) -> None:
        """Release servers, sandboxes and temp dirs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def path_digest(path: Path) -> str:
    """The digest of a task's data: a file's (cqd_mpi.digests.file_digest), or a folder's files'
    (their relative names and digests, in name order); "missing:<path>" when there is none."""
    import hashlib

    from cqd_mpi.digests import file_digest as digest_of

    path = Path(path)
    if path.is_file():
        return digest_of(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return f"missing:{path}"
    listing = "".join(f"{file.relative_to(path)}\0{digest_of(file)}\0" for file in files)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
