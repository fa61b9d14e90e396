"""What differs between search methods, as one object handed to the search loop (qd/search.py).

The loop (`Search`) owns everything the methods share: the models, the archives, the jobs
in flight, the history, ask/tell, the init and final phases and the state's view. A strategy
says three things: which candidates come next (`propose`), which archives a scored model is
offered to (`offered_to`), and which model is final (`finalize`, and `recipe` for the kinds it
adds). What it learns from scores it reads back from the told models in `propose`, so it
keeps no state a checkpoint must store beyond its `Settings` (a frozen dataclass, written
whole to state.h5 as root attributes and read back whole). docs/architecture.md shows a
new method end to end.

`Strategy` is defined in qd/search.py, beside the loop that calls it (the two refer to each
other); this module is where a method's author imports it from.
"""

from cqd_mpi.qd.search import NoSettings, Strategy

__all__ = ["NoSettings", "Strategy"]
