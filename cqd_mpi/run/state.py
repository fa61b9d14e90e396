"""Where the search state lives between generations, and the one definition of its layout.

`to_tree` and `from_tree` are the only code that knows how a core becomes the schema-v1 tree
(documented in the README for h5py users) and back; the run, `analyze` and `export` all read
a state through them. Two backends store the tree behind one interface: in memory, or in an
HDF5 file written next to the old one, fsynced and renamed into place, keeping the previous
checkpoint as state.h5.bak, so the file on disk is always a complete checkpoint, readers
never block the writer, and a truncated or corrupt state.h5 falls back to the backup.

A state is bound to its run: `resume` refuses one written under another config (its
`config_hash`) or torch thread count (`threads`), and every HDF5 file carries a `checksum`
over its datasets and attributes that `read_state` verifies, so a changed byte is damage.
"""

from __future__ import annotations

import abc
import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cqd_mpi import __version__, faults
from cqd_mpi.errors import StateError
from cqd_mpi.qd.archive import Archive, Bins
from cqd_mpi.qd.methods import method_class, method_name
from cqd_mpi.qd.params import SearchParams, from_attrs, to_attrs
from cqd_mpi.qd.records import (
    SPLITS,
    HistoryRow,
    Job,
    ModelKind,
    ModelRecipe,
    ModelRecord,
    Phase,
    RecipeKind,
    Split,
)
from cqd_mpi.qd.search import Progress, Search
from cqd_mpi.run import frozen, hdf5io, keeping
from cqd_mpi.run.hdf5io import CHECKSUM

SCHEMA_VERSION = 1
ADDED_ATTRS = {"test_every": 0}
"""Root attributes added to schema v1 since files were written without them, at the values that
reproduce what those files' runs did."""
log = logging.getLogger("cqd_mpi.run.state")


class StateBackend(abc.ABC):
    """Save and load a core; `attrs` are extra root attributes (config text, world size)."""

    binding: Mapping[str, Any] = {}
    """Root attributes every save records once `resume` has bound the backend to its run."""
    rebound = False
    """Whether `resume` found the state recording another binding (forced, or older files)."""
    recorded: Mapping[str, Any] = {}
    """The root attributes of the state `resume` read (empty when none was saved)."""

    def save(self, core: Search, *, attrs: Mapping[str, Any] | None = None) -> None:
        self.save_tree(to_tree(core), attrs={**self.binding, **(attrs or {})})

    def resume(self, config: Mapping[str, Any], *, threads: int, force: bool = False) -> Search | None:
        """The saved core (None if nothing was saved), checked to belong to the run of `config`
        (the config as a dict) computed with `threads` torch threads: a state written under
        another config or thread count is refused unless `force`. Later saves record both."""
        binding = {"config_hash": frozen.config_hash(dict(config)), "threads": int(threads)}
        tree = self.load_tree()
        if tree is not None:
            check_binding(tree["attrs"], binding, config, holder=self.describe(), force=force)
        self.binding = binding
        self.recorded = {} if tree is None else dict(tree["attrs"])
        self.rebound = tree is not None and any(tree["attrs"].get(k) != v for k, v in binding.items())
        return None if tree is None else from_tree(tree)

    def describe(self) -> str:
        return "the saved state"

    def load(self) -> Search | None:
        """The core as last saved, or None if nothing was ever saved."""
        tree = self.load_tree()
        return None if tree is None else from_tree(tree)

    @abc.abstractmethod
    def save_tree(self, tree: Mapping[str, Any], *, attrs: Mapping[str, Any] | None = None) -> None: ...

    @abc.abstractmethod
    def load_tree(self) -> dict[str, Any] | None:
        """The last saved tree, or None if nothing was ever saved."""


class MemoryBackend(StateBackend):
    """Keeps a deep copy of the tree; for tests and for runs that need no checkpoint."""

    def __init__(self):
        self._tree: dict[str, Any] | None = None

    def save_tree(self, tree, *, attrs=None):
        tree = copy.deepcopy(dict(tree))
        tree["attrs"] = {**tree.get("attrs", {}), **_root_attrs(attrs)}
        self._tree = tree

    def load_tree(self):
        return copy.deepcopy(self._tree)


class HDF5Backend(StateBackend):
    """state.h5 written atomically, with state.h5.bak holding the previous checkpoint."""

    def __init__(self, path: str | Path, *, keep_backup: bool = True):
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self.keep_backup = keep_backup
        self.source = self.path

    def save_tree(self, tree, *, attrs=None):
        import h5py

        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                hdf5io.write_group(f, tree)
                for key, value in _root_attrs(attrs).items():
                    f.attrs[key] = hdf5io.attr_value(value)
                f.attrs[CHECKSUM] = hdf5io.digest(f)
            hdf5io.fsync(tmp)
            faults.point("checkpoint", tmp)
            if self.keep_backup and self.path.exists():
                link = self.backup.with_name(f"{self.backup.name}.tmp-{os.getpid()}")
                link.unlink(missing_ok=True)
                os.link(self.path, link)
                os.replace(link, self.backup)
            os.replace(tmp, self.path)
            hdf5io.fsync(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def load_tree(self):
        if not self.path.exists() and not self.backup.exists():
            return None
        tree, self.source = self.read()
        return tree

    def describe(self) -> str:
        """The file the state was last loaded from (state.h5 or state.h5.bak)."""
        return str(self.source)

    def read(self) -> tuple[dict[str, Any], Path]:
        """The newest readable checkpoint and the file it came from: state.h5, or state.h5.bak
        when state.h5 is missing, truncated or corrupt."""
        try:
            return read_state(self.path), self.path
        except StateError as exc:
            if not self.backup.exists():
                raise
            log.warning("%s; falling back to the previous checkpoint %s", exc, self.backup)
            try:
                return read_state(self.backup), self.backup
            except StateError as exc_bak:
                raise StateError(f"{exc}; and the backup is unusable too: {exc_bak}") from None


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a state file into a tree, checking its schema version; clear StateError otherwise."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise StateError(f"{path} does not exist")
    try:
        with h5py.File(path, "r", locking=False) as f:
            version = f.attrs.get("schema_version")
            if version is None:
                raise StateError(f"{path} is not a cqd_mpi state file (no schema_version attribute)")
            if int(version) != SCHEMA_VERSION:
                raise StateError(
                    f"{path} has state schema version {int(version)}; this cqd_mpi ({__version__}) "
                    f"reads version {SCHEMA_VERSION}"
                )
            recorded = hdf5io.read_attr(f.attrs.get(CHECKSUM, ""))
            if not recorded:
                log.info("%s has no %s attribute (an older cqd_mpi wrote it); read unverified", path, CHECKSUM)
            elif recorded != hdf5io.digest(f):
                raise StateError(f"{path} is damaged: its datasets and attributes do not match its {CHECKSUM} "
                                 "attribute (changed after it was written)")
            tree = hdf5io.read_group(f)
            tree["attrs"].pop(CHECKSUM, None)
            return tree
    except StateError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise StateError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def check_binding(attrs: Mapping[str, Any], binding: Mapping[str, Any], config: Mapping[str, Any], *,
                  holder: str, force: bool) -> None:
    """Refuse (StateError) a state whose root `attrs` record another run than `binding`
    (`StateBackend.resume`): the changed keys are listed from the state's own config text; a
    hash that differs with no key changed is a config of another cqd_mpi version, accepted.
    States written before the binding existed are checked by their config text alone."""
    if attrs.get("config_hash") != binding["config_hash"] and "config" in attrs:
        recorded = frozen.upgrade(yaml.safe_load(str(attrs["config"])) or {})
        changed = frozen.differences(recorded, frozen.upgrade(dict(config)))
        frozen.refuse_changes(holder, changed, force=force)
    threads = attrs.get("threads")
    if threads is None:
        log.warning("%s does not record the torch thread count it was computed with (an older cqd_mpi "
                    "wrote it); results depend on it, so resume it with the count it started with "
                    "(runtime.threads)", holder)
    elif int(threads) != binding["threads"]:
        message = (f"{holder} was computed with {int(threads)} torch threads per process, this process has "
                   f"{binding['threads']}; floating-point results (the SVD mutation's among them) depend on "
                   f"the count, so the resumed run would not repeat an uninterrupted one")
        if not force:
            raise StateError(f"{message}. Pin the count with runtime.threads: {int(threads)} in the config "
                             "(or OMP_NUM_THREADS), or pass --force to resume with this count anyway.")
        log.warning("%s (--force)", message)


def _root_attrs(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "package_version": __version__, **(extra or {})}


def to_tree(core: Search) -> dict:
    """The search as the schema-v1 tree: dicts are groups, an "attrs" key holds a group's
    attributes, numpy arrays and lists of str are datasets (the layout the README documents).
    The parameters and the method's settings are written whole, one root attribute per field;
    the `saved` and `path` columns are the store's (run/keeping.py)."""
    k = core.k
    models = core.models
    n = len(models)
    paths = keeping.paths(core)
    tree: dict = {
        "attrs": {
            **to_attrs(core.params), "task_names": list(core.task_names), "phase": str(core.phase),
            "generations_done": core.generations_done, "next_stamp": core.next_stamp,
            "rng": "numpy SeedSequence([seed, generation, crc32(purpose)])",
            "method": method_name(core.strategy), **to_attrs(core.strategy.settings),
            **({"dropped": np.array(core.dropped, dtype=np.int64)} if core.dropped else {}),
        },
        "tasks": {},
        "archives": {},
        "models": {
            "id": np.array([r.id for r in models], dtype=np.int64),
            "kind": [str(r.kind) for r in models],
            **_columns(models, _MODEL_INTS, np.int64), **_columns(models, ("w1", "w2"), np.float64),
            "scores": np.array([r.scores for r in models], dtype=np.float64).reshape(n, k),
            "test_scores": np.array([r.test_scores for r in models], dtype=np.float64).reshape(n, k),
            "n_errors": np.array([r.n_errors for r in models], dtype=np.int64),
            "test_errors": np.array([r.test_errors for r in models], dtype=np.int64),
            "saved": np.array(keeping.kept(core), dtype=bool),
            "path": paths,
            "coefficients": np.array([r.coefficients for r in models], dtype=np.float64).reshape(n, k),
        },
        "history": _history_columns(core.history, k),
        "pending": _pending_columns(core, paths),
        "items": {},
    }
    if core.params.test_every:
        tree["curve"] = _curve_columns(core)
    for t, name in enumerate(core.task_names):
        bins = core.bins[t]
        tree["tasks"][name] = {
            "attrs": {"bc_lower": bins.lower if bins else math.nan,
                      "bc_upper": bins.upper if bins else math.nan,
                      "n_bins": bins.n_bins if bins else core.params.n_bins,
                      "auto_bins": core.auto_bins[t]},
            "search_ids": list(core.splits[name].search),
            "test_ids": list(core.splits[name].test),
        }
        group = {}
        for split in SPLITS:
            matrix = np.full((n, len(core.splits[name].ids(split))), np.nan, dtype=np.float32)
            for m, per_task in core.item_scores[split].items():
                matrix[m] = per_task[name]
            group[split] = matrix
        tree["items"][name] = group
    for name, archive in zip(core.task_names, core.archives):
        tree["archives"][name] = {
            "attrs": {"quality_task": name,
                      "bc_tasks": [core.task_names[t] for t in archive.bc_tasks]},
            "occupant": archive.occupant.copy(),
            "quality": archive.quality.copy(),
            "inserted": archive.inserted.copy(),
        }
    return tree


_MODEL_INTS = ("generation", "parent1", "parent2", "active_task", "mutation_seed")


def _curve_columns(core: Search) -> dict:
    """The budget curve (`test_every`): the told models of kind curve as the group `curve`,
    `models_evaluated` [P] and `test_scores` [P, K] (analysis/budget_curve.py reads it; the rows
    are in /models too, so from_tree needs nothing from it)."""
    told = [r for r in core.models if r.kind == ModelKind.CURVE and np.all(np.isfinite(r.test_scores))]
    return {"models_evaluated": np.array([r.generation for r in told], dtype=np.int64),
            "test_scores": np.array([r.test_scores for r in told], dtype=np.float64).reshape(len(told), core.k)}


def _columns(rows, names, dtype) -> dict:
    return {key: np.array([getattr(r, key) for r in rows], dtype=dtype) for key in names}


def from_tree(tree: Mapping) -> Search:
    """The search a schema-v1 tree describes (as `to_tree` wrote it, or an earlier version),
    built by the constructor a new search goes through, with the same checks."""
    attrs = tree["attrs"]
    names = [str(n) for n in attrs["task_names"]]
    splits = {n: Split(tuple(tree["tasks"][n]["search_ids"]), tuple(tree["tasks"][n]["test_ids"]))
              for n in names}
    columns = tree["models"]
    cls = method_class(str(attrs.get("method", "cycleqd")), "state.h5 attribute method")
    bins, auto_bins = [], []
    for name in names:
        task_attrs = tree["tasks"][name]["attrs"]
        lower = float(task_attrs["bc_lower"])
        auto_bins.append(bool(task_attrs["auto_bins"]))
        bins.append(None if math.isnan(lower) else Bins(lower, float(task_attrs["bc_upper"]), int(task_attrs["n_bins"])))
    try:
        models = [ModelRecord(
            id=int(columns["id"][i]), kind=ModelKind(str(kind)), generation=int(columns["generation"][i]),
            n_tasks=len(names), parent1=int(columns["parent1"][i]), parent2=int(columns["parent2"][i]),
            active_task=int(columns["active_task"][i]), w1=float(columns["w1"][i]),
            w2=float(columns["w2"][i]), mutation_seed=int(columns["mutation_seed"][i]),
            source=str(columns["path"][i]) if kind in (ModelKind.BASE, ModelKind.EXPERT) else "",
            scores=np.array(columns["scores"][i], dtype=np.float64),
            test_scores=np.array(columns["test_scores"][i], dtype=np.float64),
            n_errors=int(columns["n_errors"][i]), test_errors=int(columns["test_errors"][i]),
            coefficients=(np.array(columns["coefficients"][i], dtype=np.float64)
                          if "coefficients" in columns else None))
            for i, kind in enumerate(columns["kind"])]
        archives = []
        for q, name in enumerate(names):
            if name not in tree["archives"]:
                continue
            bc = [t for t in range(len(names)) if t != q]
            archive = Archive(quality_task=q, bc_tasks=bc, bins=[bins[t] for t in bc])
            group = tree["archives"][name]
            archive.occupant[...] = group["occupant"]
            archive.quality[...] = group["quality"]
            archive.inserted[...] = group["inserted"]
            archives.append(archive)
        item_scores = {s: {} for s in SPLITS}
        for split in SPLITS:
            for m in range(len(models)):
                rows = {n: np.asarray(tree["items"][n][split][m], dtype=np.float32) for n in names}
                if not all(np.isnan(r).all() for r in rows.values()):
                    item_scores[split][m] = rows
        progress = Progress(
            models=models, archives=archives, history=_history_rows(tree["history"]),
            pending=_pending_jobs(tree["pending"]), item_scores=item_scores, phase=Phase(str(attrs["phase"])),
            generations_done=int(attrs["generations_done"]), next_stamp=int(attrs["next_stamp"]),
            dropped=[(int(g), int(m)) for g, m in np.asarray(attrs.get("dropped", np.zeros((0, 2))))],
            auto_bins=auto_bins)
        return Search(params=from_attrs(SearchParams, {**ADDED_ATTRS, **attrs}), strategy=cls(from_attrs(cls.Settings, attrs)),
                      task_names=names, splits=splits, bins=bins, progress=progress)
    except (ValueError, TypeError) as exc:
        raise StateError(f"the state does not describe a {cls.__name__} search: {exc}") from None


_HISTORY_FLOATS = ("merge_s", "transfer_s", "eval_s", "total_s")


def _history_columns(rows: Sequence[HistoryRow], k: int) -> dict:
    return {
        "generation": np.array([r.generation for r in rows], dtype=np.int64),
        "active_task": np.array([r.active_task for r in rows], dtype=np.int64),
        "child_id": np.array([r.child_id for r in rows], dtype=np.int64),
        "entered": np.array([r.entered for r in rows], dtype=bool).reshape(len(rows), k),
        "eval_errors": np.array([r.eval_errors for r in rows], dtype=np.int64),
        "qd_score": np.array([r.qd_score for r in rows], dtype=np.float64).reshape(len(rows), k),
        "coverage": np.array([r.coverage for r in rows], dtype=np.float64).reshape(len(rows), k),
        **{key: np.array([getattr(r, key) for r in rows], dtype=np.float64) for key in _HISTORY_FLOATS},
    }


def _history_rows(columns: Mapping) -> list[HistoryRow]:
    return [
        HistoryRow(generation=int(columns["generation"][i]), active_task=int(columns["active_task"][i]),
                   child_id=int(columns["child_id"][i]), entered=np.array(columns["entered"][i], dtype=bool),
                   eval_errors=int(columns["eval_errors"][i]),
                   qd_score=np.array(columns["qd_score"][i], dtype=np.float64),
                   coverage=np.array(columns["coverage"][i], dtype=np.float64),
                   **{key: float(columns[key][i]) for key in _HISTORY_FLOATS})
        for i in range(len(columns["generation"]))
    ]


def _pending_columns(core: Search, paths: Sequence[str]) -> dict:
    jobs, k = core.pending, core.k
    members = np.full((len(jobs), k), -1, dtype=np.int64)
    betas = np.full((len(jobs), k), np.nan, dtype=np.float64)
    for i, job in enumerate(jobs):
        members[i, : len(job.recipe.members)] = job.recipe.members
        betas[i, : len(job.recipe.betas)] = job.recipe.betas
    return {
        "model_id": np.array([j.model_id for j in jobs], dtype=np.int64),
        "generation": np.array([j.generation for j in jobs], dtype=np.int64),
        "phase": [str(j.phase) for j in jobs],
        "split": [j.split for j in jobs],
        "recipe": [str(j.recipe.kind) for j in jobs],
        "path": [paths[j.model_id] if j.recipe.kind == RecipeKind.STORED else "" for j in jobs],
        "parent1": np.array([j.recipe.parents[0] for j in jobs], dtype=np.int64),
        "parent2": np.array([j.recipe.parents[1] for j in jobs], dtype=np.int64),
        "w1": np.array([j.recipe.weights[0] for j in jobs], dtype=np.float64),
        "w2": np.array([j.recipe.weights[1] for j in jobs], dtype=np.float64),
        "active_task": np.array([j.recipe.active_task for j in jobs], dtype=np.int64),
        "mutation_seed": np.array([j.recipe.mutation_seed for j in jobs], dtype=np.int64),
        "members": members,
        "betas": betas,
    }


def _pending_jobs(columns: Mapping) -> list[Job]:
    jobs = []
    for i in range(len(columns["model_id"])):
        members = tuple(int(m) for m in columns["members"][i] if m >= 0)
        kind = str(columns["recipe"][i])
        recipe = ModelRecipe(
            "stored" if kind == "dir" else kind,
            parents=(int(columns["parent1"][i]), int(columns["parent2"][i])),
            weights=(float(columns["w1"][i]), float(columns["w2"][i])),
            active_task=int(columns["active_task"][i]), mutation_seed=int(columns["mutation_seed"][i]),
            members=members, betas=tuple(float(b) for b in columns["betas"][i][: len(members)]))
        jobs.append(Job(int(columns["model_id"][i]), int(columns["generation"][i]), str(columns["phase"][i]),
                        str(columns["split"][i]), recipe))
    return jobs
