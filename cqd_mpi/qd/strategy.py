"""What differs between search methods, as one object handed to the search loop (qd/search.py).

The loop (`Search`) owns everything the methods share: the models, the archives, the jobs
in flight, the history, ask/tell, the init and final phases and the state's view. A strategy
says three things: which candidates come next (`propose`), which archives a scored model is
offered to (`offered_to`), and which model is final (`finalize`, and `recipe` for the kinds it
adds). What it learns from scores it reads back from the told models in `propose`, so it
keeps no state a checkpoint must store beyond its `Settings` (a frozen dataclass, written
whole to state.h5 as root attributes and read back whole). docs/architecture.md shows a
new method end to end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from cqd_mpi.qd.records import Job, ModelRecipe, ModelRecord

if TYPE_CHECKING:
    from cqd_mpi.qd.search import Search


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """A method with no settings of its own."""


class Strategy:
    """The part of a search method that is its own (the base class proposes nothing)."""

    method = ""
    """The name `qd.method` gives it (qd/methods.py)."""
    label = ""
    final_label = ""
    Settings: type = NoSettings
    min_tasks = 2
    """The fewest tasks the method makes sense with (one leaves nothing to cycle or trade off;
    run/config.py refuses fewer, naming the methods that fit: qd/methods.py)."""

    def __init__(self, settings: Any = None):
        self.settings = self.Settings() if settings is None else settings
        if not isinstance(self.settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(settings).__name__}")

    @classmethod
    def settings_from(cls, qd: Any) -> Any:
        """The method's settings from the config's `qd` section (run/config.QDConfig)."""
        return cls.Settings()

    def propose(self, search: Search) -> list[Job] | None:
        """The search-phase jobs to add now (none while the method waits for scores), or None
        when the search is over. Called after the init phase and after every search tell."""
        return None

    def offered_to(self, search: Search, record: ModelRecord) -> Collection[int]:
        """The archives (task indices) a scored model is offered to."""
        return range(search.k)

    def recipe(self, search: Search, record: ModelRecord) -> ModelRecipe | None:
        """How to build a model of a kind the method adds (None: the loop's own recipe)."""
        return None

    def finalize(self, search: Search, final: ModelRecord) -> None:
        """Fix the method's final model (kind aggregate) before its recipe is taken; the
        default is the aggregate of the archives' elites."""
