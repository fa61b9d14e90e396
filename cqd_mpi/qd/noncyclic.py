"""QD without the cycle (the paper's Table 2, trial 0): K MAP-Elites runs side by side.

The paper: "we run QD for three runs. Within each run, one of the task's metric is treated
as the quality while the others are regarded as the BCs. We control each trial to have an
equal computing budget as for CycleQD ... We use the same model aggregation method to merge
the best models from these three runs." So archive k is its own run: it starts from the
experts like every archive, its children are bred from its own elites, and they are offered
to it alone. The runs take turns (generation t belongs to run t mod K), so with the same
`qd.generations` each run gets a K-th of CycleQD's budget and the trial as a whole the same
budget; the final model is the aggregate of the K runs' elites, as in CycleQD. What CycleQD
adds is the cycle: every child is offered to every archive, so an archive's progress feeds
the others.
"""

from __future__ import annotations

from cqd_mpi.qd.cycleqd import CycleQD
from cqd_mpi.qd.records import ModelKind, ModelRecord
from cqd_mpi.qd.search import Search


class NonCyclicQD(CycleQD):
    """K independent single-quality MAP-Elites runs, interleaved, sharing the final aggregation."""

    method = "qd"
    label = "QD"
    final_label = "QD aggregate"

    def offered_to(self, search: Search, record: ModelRecord) -> range | tuple[int, ...]:
        """A child enters only the run (archive) that bred it; the experts seed every run."""
        if record.kind == ModelKind.CHILD:
            return (record.active_task,)
        return range(search.k)
