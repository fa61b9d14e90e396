"""Where a run keeps the weights of the children it needs: on disk in models/<id>, or as a
recipe, rebuilt bit for bit on demand from ancestors that are.

The models a run needs are its archive members and the inputs of its pending jobs
(`Search.live_models`), plus, for each needed child not on disk, its parents, down to models
that are on disk or to the experts. With `runtime.model_store_bytes` set, children beyond the
budget are evicted, those least likely to be drawn as parents first (models in no archive,
then by sampling probability, then least recently used), but never the experts, the current
elites, the inputs of jobs in flight, nor a model whose eviction would put a needed model
more than `runtime.model_store_depth` chained merges away from weights on disk. Without a
budget every needed child stays on disk, as before. Either way the state file is the same:
`saved` says that the run keeps a model (run/keeping.py decides which), not where its bytes are.

A digest of each child's tensors is recorded in RUN_DIR/digests.json when it is saved, and a
rebuilt child must match it, so a recipe that no longer reproduces its model (an expert
changed on disk, another torch thread count) is found instead of used. A child read from disk
(as a parent, a member, a stored model) must match it too, checked once per process and again
whenever its files change (run/integrity.py). At resume `check` rebuilds what it can and names
the models that are lost (`run --drop-lost` drops them), and writes digests.json again from
the saved children when it is missing.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cqd_mpi.errors import CqdError, StateError
from cqd_mpi.merging.builder import ModelBuilder
from cqd_mpi.merging.embedding import VisionLayout
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.weights import ModelDir
from cqd_mpi.qd.records import ModelKind, Phase, RecipeKind
from cqd_mpi.qd.search import Search
from cqd_mpi.run import keeping
from cqd_mpi.run.config import RuntimeConfig
from cqd_mpi.run.integrity import FileKeys, refuse_child, weights_digest
from cqd_mpi.run.rundir import RunDir, atomic_write_text

log = logging.getLogger("cqd_mpi.run.store")

class LostModels(StateError):
    """Models the run needs whose weights are gone and cannot be rebuilt bit for bit."""

    def __init__(self, message: str, lost: Iterable[int]):
        super().__init__(message)
        self.lost = sorted(lost)


class ModelStore:
    """The weights of one run's models, and the builder that makes them (one factory: the
    builder reads stored models through `path`, which rebuilds a child off disk first).
    `keeps(id)` after each tell says where a model goes (run/keeping.py decides), `saved(id)`
    follows each save, `settle()` each checkpoint, and `check()` a resume. Without `mutation`
    the store has no builder and rebuilds nothing. A `read_only` store never writes the run dir
    and rebuilds into `scratch` (export reads runs that may be in progress)."""

    def __init__(self, *, core: Search, rundir: RunDir, mutation: MutationSpec | None = None,
                 basis_cache: str | Path | None = None, max_shard_size: str | int = "5GB",
                 budget: int | None = None, max_depth: int = RuntimeConfig.model_store_depth,
                 read_only: bool = False, vision: VisionLayout | None = None, echo=None):
        self.core = core
        self.rundir = rundir
        self.budget = budget
        self.max_depth = int(max_depth)
        self.read_only = read_only
        self.scratch: Path | None = None
        self.echo = echo or log.info
        self.builder = None if mutation is None else ModelBuilder(
            base_path=rundir.weights_of(core.models[core.base_id]),
            expert_paths=[str(rundir.weights_of(core.models[e])) for e in core.expert_ids],
            model_path=self.path, mutation=mutation, basis_cache=basis_cache, max_shard_size=max_shard_size,
            vision=vision)
        self.rebuilt = 0
        self.rebuild_s = 0.0
        self.evicted = 0
        self.digest_s = 0.0
        self.verified = 0
        self.verify_s = 0.0
        self._checked = FileKeys()
        self._clock = itertools.count()
        self._used: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._digests: dict[str, str] = {}
        self._mismatched: set[int] = set()
        self._over_budget = False
        if rundir.digests_path.exists():
            try:
                content = json.loads(rundir.digests_path.read_text())
                self._digests = {str(k): str(v) for k, v in content["digests"].items()}
                self._mismatched = {int(m) for m in content["mismatched"]}
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise StateError(f"{rundir.digests_path} is unreadable ({type(exc).__name__}: {exc}); delete it to "
                                 "resume without checking rebuilt models against their digests") from None

    # where weights are ------------------------------------------------------------------------

    def _kind(self, m: int) -> str:
        return self.core.models[m].kind

    def location(self, m: int) -> Path:
        """Where child m's weights are (or go when rebuilt); the user's dir for base and experts."""
        record = self.core.models[m]
        if record.kind != ModelKind.CHILD:
            return self.rundir.weights_of(record)
        if self.read_only and self.scratch is not None and not self.rundir.model_dir(m).is_dir():
            return self.scratch / str(m)
        return self.rundir.model_dir(m)

    def on_disk(self, m: int) -> bool:
        return self._kind(m) != ModelKind.CHILD or self.location(m).is_dir()

    def path(self, m: int) -> Path:
        """The dir of model m's weights, rebuilding it (and the ancestors that needs) when it is off disk."""
        if self._kind(m) not in (ModelKind.BASE, ModelKind.EXPERT, ModelKind.CHILD):
            raise StateError(f"model {m} ({self._kind(m)}) has no weights in the run")
        if not self.on_disk(m):
            for a in self._plan(m):
                self._rebuild(a)
        self._used[m] = next(self._clock)
        if self._kind(m) == ModelKind.CHILD:
            self._verify(m)
        return self.location(m)

    def _verify(self, m: int) -> None:
        """Child m's weights on disk match its digest in digests.json (recorded there when it has
        none): hashed the first time this process reads it, again only once its files changed."""
        target = self.location(m)
        if self._checked.current(m, target):
            return
        start = time.perf_counter()
        key = self._checked.of(target)
        found = weights_digest(target)
        known = self._digests.get(str(m))
        if known is None:
            self._record(m, found)
        elif known != found:
            raise refuse_child(m, target, self.rundir.digests_path, found, known)
        self._checked.remember(m, key)
        self.verified += 1
        self.verify_s += time.perf_counter() - start

    def _plan(self, m: int) -> list[int]:
        """The children off disk that rebuilding m needs, parents before children (ids are in
        that order)."""
        plan, stack = set(), [m]
        while stack:
            x = stack.pop()
            if x in plan or self.on_disk(x):
                continue
            plan.add(x)
            record = self.core.models[x]
            stack.extend(p for p in (record.parent1, record.parent2) if p >= 0)
        return sorted(plan)

    def _rebuild(self, m: int) -> None:
        if self.builder is None or (self.read_only and self.scratch is None):
            raise StateError(f"child #{m} is off disk and this store has nowhere to rebuild it")
        start = time.perf_counter()
        target = self.location(m)
        self.builder.write(m, self.core.recipe(m), target)
        key = self._checked.of(target)
        found = weights_digest(target)
        known = self._digests.get(str(m))
        if known is not None and known != found:
            shutil.rmtree(target, ignore_errors=True)
            self._mismatched.add(m)
            self._write_digests()
            raise LostModels(f"child #{m} rebuilt from its recipe differs from the model the run saved "
                             f"({found} != {known}): an expert or the base changed on disk since, or the "
                             "torch thread count did. Resuming says which models are lost; `run --drop-lost` "
                             "goes on without them", [m])
        if m in self._mismatched:
            self._mismatched.discard(m)
            self._write_digests()
        if known is None:
            self._record(m, found)
        self._checked.remember(m, key)
        self.rebuilt += 1
        self.rebuild_s += time.perf_counter() - start
        log.info("rebuilt child #%d from its recipe into %s", m, target)

    def _record(self, m: int, digest: str) -> None:
        self._digests[str(m)] = digest
        self._write_digests()

    def _write_digests(self) -> None:
        """digests.json: each saved child's digest, and the children whose rebuild did not match it
        (retried, and named as lost, at the next resume)."""
        if not self.read_only:
            atomic_write_text(self.rundir.digests_path, json.dumps(
                {"digests": self._digests, "mismatched": sorted(self._mismatched)}, sort_keys=True) + "\n")

    def keeps(self, m: int) -> Path | None:
        """Where model m's weights go once it is told (run/keeping.py): models/<m> for a child
        the run keeps, final/ for the final model, None for a model the run does not keep."""
        record = self.core.models[m]
        if record.kind == ModelKind.AGGREGATE:
            return self.rundir.final_dir
        if record.kind == ModelKind.CHILD and keeping.kept(self.core)[m]:
            return self.rundir.model_dir(m)
        return None

    def saved(self, m: int) -> None:
        """Model m was just written where `keeps` said: for a child, record its digest."""
        if self._kind(m) != ModelKind.CHILD:
            return
        start = time.perf_counter()
        key = self._checked.of(self.rundir.model_dir(m))
        self._record(m, weights_digest(self.rundir.model_dir(m)))
        self._checked.remember(m, key)
        self.digest_s += time.perf_counter() - start
        self._used[m] = next(self._clock)

    def stats(self) -> dict:
        """What this process's store did: for report.json and the benchmark."""
        return {"budget_bytes": self.budget, "disk_bytes": self.disk_bytes(), "on_disk": len(self.on_disk_children()),
                "evicted": self.evicted, "rebuilt": self.rebuilt, "rebuild_s": self.rebuild_s,
                "digest_s": self.digest_s, "verified": self.verified, "verify_s": self.verify_s}

    # what the run needs -------------------------------------------------------------------------

    def _roots(self) -> set[int]:
        roots = set(self.core.live_models())
        roots.update(job.model_id for job in self.core.pending if job.recipe.kind == RecipeKind.STORED)
        return roots

    def pinned(self) -> set[int]:
        """Never evicted: the elites and every input of a pending job."""
        pinned = {job.model_id for job in self.core.pending if job.recipe.kind == RecipeKind.STORED}
        for job in self.core.pending:
            pinned.update(m for m in job.recipe.parents if m >= 0)
            pinned.update(job.recipe.members)
        if self.core.archives and self.core.phase != Phase.INIT:
            pinned.update(a.elite() for a in self.core.archives if a.members().size)
        return pinned

    def needed(self, off: set[int] | None = None) -> tuple[set[int], dict[int, int]]:
        """The children the run needs with the children in `off` off disk (default: the disk as
        it is), and each needed child's rebuild depth (0 on disk, else 1 + its parents' deepest)."""
        def is_off(x: int) -> bool:
            return self._kind(x) == ModelKind.CHILD and (not self.on_disk(x) if off is None else x in off)

        needed, stack = set(), [m for m in self._roots() if self._kind(m) == ModelKind.CHILD]
        while stack:
            x = stack.pop()
            if x in needed:
                continue
            needed.add(x)
            if is_off(x):
                record = self.core.models[x]
                stack.extend(p for p in (record.parent1, record.parent2) if p >= 0 and self._kind(p) == ModelKind.CHILD)
        depth: dict[int, int] = {}
        for x in sorted(needed):
            record = self.core.models[x]
            depth[x] = 1 + max(depth.get(p, 0) for p in (record.parent1, record.parent2)) if is_off(x) else 0
        return needed, depth

    def on_disk_children(self) -> list[int]:
        if not self.rundir.models_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.rundir.models_dir.iterdir()
                      if p.name.isdigit() and int(p.name) < len(self.core.models) and p.is_dir())

    def size(self, m: int) -> int:
        if m not in self._sizes:
            self._sizes[m] = sum(f.stat().st_size for f in self.rundir.model_dir(m).iterdir() if f.is_file())
        return self._sizes[m]

    def disk_bytes(self) -> int:
        return sum(self.size(m) for m in self.on_disk_children())

    # after each checkpoint ------------------------------------------------------------------------

    def sweep(self) -> list[int]:
        """At start: delete model dirs the run does not know, unfinished temp dirs, and dirs of
        children it no longer needs."""
        needed, _ = self.needed()
        return self.rundir.sweep(needed)

    def settle(self) -> list[int]:
        """After a checkpoint: delete the children no longer needed, then evict children until
        the disk is within the budget (or nothing more may go). Returns the evicted ids."""
        needed, _ = self.needed()
        for m in self.on_disk_children():
            if m not in needed:
                self._delete(m)
        if self.budget is None:
            return []
        total = self.disk_bytes()
        evicted: list[int] = []
        if total > self.budget:
            pinned = self.pinned()
            off = {r.id for r in self.core.models if r.kind == ModelKind.CHILD} - set(self.on_disk_children())
            chance = self._sampling_chance()
            candidates = sorted((m for m in self.on_disk_children() if m not in pinned),
                                key=lambda m: (chance.get(m, 0.0), self._used.get(m, -1), m))
            for m in candidates:
                if total <= self.budget:
                    break
                _, depth = self.needed(off | {m})
                if max(depth.values(), default=0) > self.max_depth:
                    continue
                if str(m) not in self._digests:
                    self._verify(m)
                total -= self.size(m)
                self._delete(m)
                off.add(m)
                evicted.append(m)
        self.evicted += len(evicted)
        over = total > self.budget
        if over and not self._over_budget:
            log.warning("the model store holds %d bytes, over runtime.model_store_bytes (%d): the rest are "
                        "elites, inputs of jobs in flight, or ancestors within %d merges of a needed model",
                        total, self.budget, self.max_depth)
        self._over_budget = over
        return evicted

    def _sampling_chance(self) -> dict[int, float]:
        """Each member's largest probability of being drawn as a parent in one of its archives
        (elite or uniform sampling, as the run samples): members unlikely to be drawn soon, and
        models in no archive, are evicted first."""
        from cqd_mpi.qd.sampling import elite_weights

        chance: dict[int, float] = {}
        for archive in self.core.archives:
            members = archive.members()
            if not members.size:
                continue
            params = self.core.params
            if params.sampling == "elite":
                p = elite_weights(np.stack([self.core.models[m].scores for m in members]),
                                  alpha_low=params.alpha_low, alpha_high=params.alpha_high)
            else:
                p = np.full(members.size, 1.0 / members.size)
            for m, q in zip(members.tolist(), p.tolist()):
                chance[m] = max(chance.get(m, 0.0), q)
        return chance

    def _delete(self, m: int) -> None:
        """Renamed away first, so a crash never leaves a partial models/<m> (sweep removes the rest)."""
        target = self.rundir.model_dir(m)
        if target.is_dir():
            gone = target.with_name(f"{m}.deleted")
            shutil.rmtree(gone, ignore_errors=True)
            os.rename(target, gone)
            shutil.rmtree(gone, ignore_errors=True)
        self._sizes.pop(m, None)
        self._checked.forget(m)

    # at resume -------------------------------------------------------------------------------

    def _rewrite_digests(self) -> None:
        """digests.json is missing: record the digest of every saved child from its weights as
        they are now (a child saved after this is recorded at its save, as always)."""
        children = self.on_disk_children()
        for m in children:
            self._verify(m)
        self._write_digests()
        if children:
            log.warning("%s was missing: recorded the digests of %d saved children from their weights as they "
                        "are now", self.rundir.digests_path, len(children))
            self.echo(f"rewrote {self.rundir.digests_path.name} from the {len(children)} saved children's weights "
                      "(it was missing)")

    def check(self, *, drop_lost: bool = False) -> list[int]:
        """Make sure every model the run needs is on disk or rebuildable: rebuild the missing
        ones (without a budget all of them; with one, the pinned ones and those too deep), and
        name those that cannot be. Returns the ids dropped (with `drop_lost`); raises
        LostModels otherwise."""
        sources = {}
        for m in [self.core.base_id, *self.core.expert_ids]:
            try:
                ModelDir(self.location(m))
            except CqdError as exc:
                sources[m] = str(exc)
        if sources:
            listing = "\n  ".join(f"#{m} ({self._kind(m)}): {why}" for m, why in sources.items())
            raise StateError(f"the run needs the weights of its base and experts, and these are unreadable:"
                             f"\n  {listing}\nRestore them at the paths the config gives.")
        needed, _ = self.needed()
        for m in sorted(needed):
            if self.on_disk(m):
                try:
                    ModelDir(self.location(m))
                except CqdError as exc:
                    log.warning("child #%d: %s; deleting it to rebuild it from its recipe", m, exc)
                    self._delete(m)
        if not self.read_only and not self.rundir.digests_path.exists():
            self._rewrite_digests()
        lost: set[int] = set()
        why: list[str] = []
        while True:
            needed, depth = self.needed()
            pinned = self.pinned()
            todo = sorted(m for m in needed if not self.on_disk(m) and m not in lost and (
                self.budget is None or m in pinned or depth[m] > self.max_depth or m in self._mismatched))
            todo = [m for m in todo if not (set(self._plan(m)) & lost)]
            if not todo:
                break
            m = todo[0]
            try:
                for a in self._plan(m):
                    self._rebuild(a)
                self.echo(f"rebuilt child #{m} from its recipe (its weights were missing)")
            except LostModels as exc:
                lost.update(exc.lost)
                why.append(str(exc))
                log.error("%s", exc)
        lost.update(m for m in needed if not self.on_disk(m) and set(self._plan(m)) & lost)
        if not lost:
            self.settle()
            return []
        members = {int(x) for a in self.core.archives for x in a.members()}
        listing = ", ".join(f"#{m}" + (" (archive member)" if m in members else "") for m in sorted(lost))
        if not drop_lost:
            raise LostModels(
                f"{self.rundir.path}: the weights of models {listing} are missing and cannot be rebuilt bit for "
                f"bit from their recipes ({'; '.join(why)}), so the run cannot go on with them. Restore their "
                f"dirs under {self.rundir.models_dir}, or rerun with `run --drop-lost` to drop them from the "
                "archives and continue (the results then differ from an uninterrupted run).", lost)
        dropped = sorted(lost & self._roots())
        self.core.drop(dropped)
        self._mismatched -= lost
        self._write_digests()
        self.settle()
        log.warning("--drop-lost: dropped models %s from the archives after generation %d",
                    ", ".join(f"#{m}" for m in dropped), self.core.generations_done)
        self.echo(f"dropped lost models {', '.join(f'#{m}' for m in dropped)} from the archives (--drop-lost)")
        return dropped
