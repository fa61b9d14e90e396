"""CycleQD's own part of the search (Kuroki et al., 2024): children bred from one archive's
elites and offered to every archive, the quality role rotating every generation.

Generation t = 1..N, active archive i = t mod K: two parents sampled from archive i,
crossover weights drawn, a mutation seed drawn; the child is offered to all archives. With
pipeline_depth d, child t is sampled right after generation t-1-d is told (so up to d+1
children are in flight), whatever the runtime's timing. The final model is the aggregate
of the archives' elites (the loop's default). The loop itself is qd/search.py.
"""

from __future__ import annotations

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.qd.records import Job, ModelKind, Phase
from cqd_mpi.qd.sampling import sample_crossover_weights, sample_parents
from cqd_mpi.qd.search import Search
from cqd_mpi.qd.strategy import Strategy


class CycleQD(Strategy):
    """Children from crossover + mutation of two elites of the active archive, offered to all."""

    method = "cycleqd"
    label = "CycleQD"
    final_label = "CycleQD aggregate"

    def propose(self, search: Search) -> list[Job]:
        """Children until d+1 are in flight or the budget is reached."""
        jobs = []
        in_flight = sum(1 for job in search.pending if job.phase == Phase.SEARCH)
        while in_flight <= search.params.pipeline_depth:
            t = search.generations_done + in_flight + 1
            if t > search.params.generations:
                break
            jobs.append(self.child(search, t))
            in_flight += 1
        return jobs

    def child(self, search: Search, t: int) -> Job:
        """Generation t's child: parents from the active archive, crossover weights, mutation seed."""
        p = search.params
        active = search.active_task(t)
        members = search.archives[active].members()
        scores = np.stack([search.models[m].scores for m in members])
        p1, p2 = sample_parents(seeding.numpy_rng(p.seed, t, "sampling"), members, scores,
                                method=p.sampling, alpha_low=p.alpha_low, alpha_high=p.alpha_high)
        w1, w2 = sample_crossover_weights(seeding.numpy_rng(p.seed, t, "crossover"), p.crossover_mu, p.crossover_sigma)
        record = search.add_model(ModelKind.CHILD, t, parent1=p1, parent2=p2, active_task=active,
                                  w1=w1, w2=w2, mutation_seed=seeding.derive_seed(p.seed, t, "mutation"))
        return Job(record.id, t, Phase.SEARCH, "search", search.recipe(record.id))
