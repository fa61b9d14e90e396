"""Searches over the K coefficients of the experts' task vectors: CMA-ES and NSGA-II (the
paper's Table 1, models 9 and 10), on the same runtime as CycleQD.

A candidate c gives the model theta_base + sum_k c_k tau_k (a /models row of kind
"combination", its recipe the aggregate of the experts with betas c). A population of
candidates is issued at once, so eval groups score its members in parallel; when the last
one is told, the optimizer learns the population's scores and asks for the next. The search
budget is `qd.generations` models evaluated, as for CycleQD (the last population is cut
short at the budget). The final model (kind "aggregate", written to RUN_DIR/final) is the
candidate with the best mean on the search split, which for NSGA-II is the best mean on the
front of every candidate evaluated (a best-mean point is never dominated).

Every candidate is also offered to CycleQD-style archives that the search does not read,
so `analyze` draws the same elite maps and progress curves for these runs.

Resume: no optimizer state is stored. Every random draw of population i comes from
seeding keyed by (seed, i, purpose), and the optimizer is rebuilt by replaying the stored
candidates and scores: population i is asked again, checked against the stored
coefficients bit for bit, and told its stored scores (replaying costs the optimizer's own
arithmetic only, a few milliseconds per population in K dimensions). The libraries are
imported on first use, with an error naming the extra that installs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.errors import StateError, require
from cqd_mpi.qd.params import coerce
from cqd_mpi.qd.records import Job, ModelKind, ModelRecipe, ModelRecord, Phase, RecipeKind
from cqd_mpi.qd.search import Search
from cqd_mpi.qd.strategy import Strategy

log = logging.getLogger("cqd_mpi.qd.coefficients")


@contextlib.contextmanager
def keyed_global_numpy(seed: int, population: int, purpose: str) -> Iterator[None]:
    """numpy's global generator seeded by (seed, population, purpose) inside the block and
    restored after it, for any draw a library makes from it behind our back."""
    saved = np.random.get_state()
    np.random.seed(seeding.derive_seed(seed, population, purpose) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclasses.dataclass(frozen=True)
class CoefficientSettings:
    """The coefficient searches' own settings (config `qd.coefficients`; state.h5 root attributes
    under these names)."""

    population: int = 8
    sigma0: float = 0.1
    coefficient_lower: float = 0.0
    coefficient_upper: float = 1.0

    def __post_init__(self):
        coerce(self)
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        if not self.coefficient_upper > self.coefficient_lower:
            raise ValueError(f"coefficients need upper > lower, got lower={self.coefficient_lower}, "
                             f"upper={self.coefficient_upper}")


class CoefficientSearch(Strategy):
    """The population loop shared by CMA-ES and NSGA-II; subclasses supply the optimizer
    (`_new_optimizer`, `_ask(i) -> X`, `_tell(i, X, scores)`)."""

    Settings = CoefficientSettings

    def __init__(self, settings: CoefficientSettings | None = None):
        super().__init__(settings)
        self._optimizer = None
        self._asked: tuple[int, np.ndarray] | None = None

    @classmethod
    def settings_from(cls, qd) -> CoefficientSettings:
        c = qd.coefficients
        return CoefficientSettings(population=c.population, sigma0=c.sigma0, coefficient_lower=c.lower,
                                   coefficient_upper=c.upper)

    population = property(lambda self: self.settings.population)
    sigma0 = property(lambda self: self.settings.sigma0)
    lower = property(lambda self: self.settings.coefficient_lower)
    upper = property(lambda self: self.settings.coefficient_upper)

    # the search phase ---------------------------------------------------------------------

    @staticmethod
    def candidates(search: Search) -> list[ModelRecord]:
        return [r for r in search.models if r.kind == ModelKind.COMBINATION]

    def propose(self, search: Search) -> list[Job] | None:
        """The next population when the last one is told (the optimizer learns its scores first)."""
        if any(job.phase == Phase.SEARCH for job in search.pending):
            return []
        self.k, self.seed = search.k, search.params.seed
        generations = search.params.generations
        rows = self.candidates(search)
        if len(rows) >= generations:
            return None
        if self._optimizer is None:
            self._replay(rows)
        if self._asked is not None:
            i, x = self._asked
            self._tell(i, x, np.stack([r.scores for r in rows[len(rows) - len(x):]]))
            nxt = i + 1
        else:
            nxt = 0
        x = self._ask(nxt)
        self._asked = (nxt, x)
        if len(x) == 0:
            log.warning("%s asked for no candidate in population %d (it found no new point); the search "
                        "ends after %d of %d evaluations", self.label, nxt, len(rows), generations)
            return None
        jobs = []
        for c in x[: generations - len(rows)]:
            t = len(self.candidates(search)) + 1
            record = search.add_model(ModelKind.COMBINATION, t, coefficients=np.array(c, dtype=np.float64))
            jobs.append(Job(record.id, t, Phase.SEARCH, "search", search.recipe(record.id)))
        return jobs

    def _replay(self, rows: Sequence[ModelRecord]) -> None:
        """Rebuild the optimizer from the stored candidates: every population asked again
        (and checked), every complete one but the last told its stored scores."""
        self._optimizer = self._new_optimizer()
        used, i = 0, 0
        while used < len(rows):
            x = self._ask(i)
            batch = rows[used: used + len(x)]
            stored = np.stack([r.coefficients for r in batch])
            if not np.array_equal(stored, x[: len(batch)]):
                raise StateError(
                    f"replaying {self.label} population {i}: the optimizer asks for {x[: len(batch)].tolist()}, "
                    f"but the state stores {stored.tolist()} (models {batch[0].id}..{batch[-1].id}); the state "
                    "was written by another version of the optimizer library or of cqd_mpi")
            used += len(batch)
            if used < len(rows):
                self._tell(i, x, np.stack([r.scores for r in batch]))
            else:
                self._asked = (i, x)
            i += 1

    # models ------------------------------------------------------------------------------

    def best_candidate(self, search: Search) -> ModelRecord:
        """The candidate with the best mean search score (ties: the earliest)."""
        rows = [r for r in self.candidates(search) if np.all(np.isfinite(r.scores))]
        if not rows:
            raise ValueError("no candidate has been scored yet")
        return max(rows, key=lambda r: (float(np.mean(r.scores)), -r.id))

    def finalize(self, search: Search, final: ModelRecord) -> None:
        """The final model is the best candidate, rebuilt from its coefficients."""
        final.coefficients = np.array(self.best_candidate(search).coefficients, dtype=np.float64)

    def recipe(self, search: Search, record: ModelRecord) -> ModelRecipe | None:
        """A candidate, the final model and a budget-curve point: theta_base + sum_k c_k tau_k over the experts."""
        if record.kind == ModelKind.COMBINATION or (
                record.kind in (ModelKind.AGGREGATE, ModelKind.CURVE) and np.all(np.isfinite(record.coefficients))):
            return ModelRecipe(RecipeKind.AGGREGATE, members=tuple(search.expert_ids),
                               betas=tuple(float(c) for c in record.coefficients))
        return None

    # the optimizer ----------------------------------------------------------------------

    def _new_optimizer(self):
        raise TypeError(f"{type(self).__name__} is not a search method: it names no optimizer")

    def _ask(self, i: int) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} is not a search method: it names no optimizer")

    def _tell(self, i: int, x: np.ndarray, scores: np.ndarray) -> None:
        raise TypeError(f"{type(self).__name__} is not a search method: it names no optimizer")


class CMAES(CoefficientSearch):
    """CMA-ES (the `cma` library) maximising the mean metric, from the naive average
    c = 1/K (clipped into the box) with step size `sigma0`, within [lower, upper]^K,
    population `population`; cma's own stopping rules are off, the budget ends the search."""

    method = "cma-es"
    label = "CMA-ES"
    final_label = "CMA-ES best"
    min_tasks = 1

    def _new_optimizer(self):
        cma = require("cma", extra="baselines", feature="qd.method cma-es")
        self._draws = None

        def randn(*shape):
            return self._draws.standard_normal(shape)

        options = {"popsize": self.population, "bounds": [self.lower, self.upper], "seed": np.nan,
                   "randn": randn, "verbose": -9, "verb_log": 0, "verb_disp": 0, "maxiter": np.inf,
                   "tolfun": 0, "tolx": 0, "tolflatfitness": np.inf, "tolstagnation": np.inf}
        with keyed_global_numpy(self.seed, 0, "cma-es:init"):
            x0 = np.clip(np.full(self.k, 1.0 / self.k), self.lower, self.upper)
            return cma.CMAEvolutionStrategy(list(x0), self.sigma0, options)

    def _ask(self, i: int) -> np.ndarray:
        self._draws = seeding.numpy_rng(self.seed, i, "cma-es:ask")
        with keyed_global_numpy(self.seed, i, "cma-es:ask-global"):
            return np.array(self._optimizer.ask(), dtype=np.float64)

    def _tell(self, i: int, x: np.ndarray, scores: np.ndarray) -> None:
        self._draws = seeding.numpy_rng(self.seed, i, "cma-es:tell")
        with keyed_global_numpy(self.seed, i, "cma-es:tell-global"):
            self._optimizer.tell(list(x), [-float(np.mean(s)) for s in scores])


class NSGA2(CoefficientSearch):
    """NSGA-II (pymoo) with the K metrics as objectives over [lower, upper]^K, population
    `population` (pymoo's defaults: random initial population, SBX crossover, polynomial
    mutation, duplicates eliminated)."""

    method = "nsga2"
    label = "NSGA-II"
    final_label = "NSGA-II front's best"

    def _new_optimizer(self):
        require("pymoo", extra="baselines", feature="qd.method nsga2")
        from pymoo.algorithms.moo.nsga2 import NSGA2 as Algorithm
        from pymoo.core.problem import Problem

        problem = Problem(n_var=self.k, n_obj=self.k, xl=np.full(self.k, self.lower), xu=np.full(self.k, self.upper))
        algorithm = Algorithm(pop_size=self.population)
        with keyed_global_numpy(self.seed, 0, "nsga2:init"):
            algorithm.setup(problem, termination=("n_gen", 2**31), seed=seeding.derive_seed(self.seed, 0, "nsga2") % 2**32,
                            verbose=False)
        self._asked_population = None
        return algorithm

    def _ask(self, i: int) -> np.ndarray:
        self._optimizer.random_state = seeding.numpy_rng(self.seed, i, "nsga2:ask")
        with keyed_global_numpy(self.seed, i, "nsga2:ask-global"):
            self._asked_population = self._optimizer.ask()
        return np.array(self._asked_population.get("X"), dtype=np.float64)

    def _tell(self, i: int, x: np.ndarray, scores: np.ndarray) -> None:
        population = self._asked_population
        population.set("F", -np.asarray(scores, dtype=np.float64))
        self._optimizer.random_state = seeding.numpy_rng(self.seed, i, "nsga2:tell")
        with keyed_global_numpy(self.seed, i, "nsga2:tell-global"):
            self._optimizer.tell(infills=population)
