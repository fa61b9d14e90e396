"""A null evaluator for runtime benchmarks: it scores without running the model, so a
generation's time is the runtime's own cost (merge, transfer, gather, archive, checkpoint)."""

from __future__ import annotations

import dataclasses
import zlib

from cqd_mpi.tasks.base import ItemResult, Task


@dataclasses.dataclass
class NullSettings:
    n_items: int = 8


class NullTask(Task):
    kind = "null"
    Settings = NullSettings

    def item_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.settings.n_items)]

    def evaluate(self, model, item_ids):
        return [ItemResult(i, float(zlib.crc32(i.encode()) % 2)) for i in item_ids]
