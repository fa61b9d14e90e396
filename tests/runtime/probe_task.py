"""A small real task for runtime tests: scores depend on the live model's greedy generations.

Item i asks the model to continue a seeded prompt by a few tokens; it scores 1 when the
completion's character sum is even. Random tiny models thus score about 0.5 with a spread
that depends on their weights, which is all the runtime tests need.
"""

from __future__ import annotations

import dataclasses
import random

from cqd_mpi.tasks.base import ItemResult, Task


@dataclasses.dataclass
class ProbeSettings:
    n_items: int = 24
    salt: str = ""
    max_new_tokens: int = 3


class ProbeTask(Task):
    kind = "probe"
    Settings = ProbeSettings

    def item_ids(self) -> list[str]:
        return [f"{self.settings.salt}-{i}" for i in range(self.settings.n_items)]

    def prompt(self, item_id: str) -> str:
        rng = random.Random(item_id)
        return " ".join(rng.choice(["def", "return", "for", "x", "(", ")", "+", "1", "if"]) for _ in range(6))

    def evaluate(self, model, item_ids):
        completions = model.generate([self.prompt(i) for i in item_ids],
                                     max_new_tokens=self.settings.max_new_tokens)
        return [ItemResult(item_id=i, score=float(sum(map(ord, c)) % 2 == 0), detail={"completion": c})
                for i, c in zip(item_ids, completions)]
