"""Taking models out of a run as Hugging Face dirs: any model by id, an archive's elite, or
the aggregate with the run's betas or others.

A model whose weights are on disk (base, experts, archive members, the final aggregate) is
streamed from its dir. One that is not is rebuilt from its recipe in /models, which is
deterministic: a child from its parents, crossover weights and mutation seed (parents off
disk, such as members a `runtime.model_store_bytes` budget evicted, are rebuilt first, next to
the output, through run/store.py), the naive average and the aggregate from their members. The
default aggregate (temperature 1) uses the same elites and the same softmax as the run, so
it reproduces RUN_DIR/final byte for byte.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from cqd_mpi import schema
from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.errors import ConfigError, StateError, yaml_problem
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from cqd_mpi.qd.coefficients import CoefficientSearch
from cqd_mpi.qd.records import ModelKind, ModelRecipe, Phase, RecipeKind
from cqd_mpi.run.store import ModelStore


class Exporter:
    """Writes models of one run (a `RunState` snapshot) as HF dirs."""

    def __init__(self, run: RunState, *, max_shard_size: str | int | None = None):
        self.run = run
        runtime = self._config().get("runtime") or {}
        self.max_shard_size = max_shard_size or runtime.get("max_shard_size") or "5GB"
        self._store: ModelStore | None = None

    def _config(self) -> dict:
        text = self.run.config_text
        if not text and self.run.rundir.config_path.exists():
            text = self.run.rundir.config_path.read_text()
        try:
            data = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as exc:
            raise StateError(f"{self.run.source}: the frozen config is not valid YAML: {yaml_problem(exc)}") from None
        return data if isinstance(data, dict) else {}

    # where weights are ------------------------------------------------------------------------

    def stored_path(self, model_id: int) -> Path | None:
        """The dir holding the model's weights, or None when the run has none for it."""
        run = self.run
        record = run.models[model_id]
        kept = run.kept[model_id]
        if record.kind in (ModelKind.BASE, ModelKind.EXPERT) or (
                record.kind == ModelKind.AGGREGATE and kept and run.phase == Phase.DONE):
            return run.rundir.weights_of(record)
        if record.kind == ModelKind.CHILD and kept and run.rundir.model_dir(model_id).is_dir():
            return run.rundir.model_dir(model_id)
        return None

    def _source(self, model_id: int) -> ModelDir:
        path = self.stored_path(model_id)
        if path is None:
            raise StateError(f"{self.run.describe(model_id)} has no weights on disk")
        if not path.is_dir():
            raise StateError(f"the weights of {self.run.describe(model_id)} should be in {path}, which is missing "
                             "(a run in progress may have removed them after the checkpoint that was read)")
        return ModelDir(path)

    @property
    def store(self) -> ModelStore:
        """The run's model store and its builder, configured like the run (mutation settings from
        its frozen config), read-only."""
        if self._store is None:
            from cqd_mpi.run.vision import frozen_layout

            config = self._config()
            mutation = schema.build(MutationSpec, (config.get("qd") or {}).get("mutation") or {}, "qd.mutation")
            runtime = config.get("runtime") or {}
            self._store = ModelStore(core=self.run.core, rundir=self.run.rundir, read_only=True, mutation=mutation,
                                     basis_cache=runtime.get("basis_cache"), max_shard_size=self.max_shard_size,
                                     vision=frozen_layout(config))
        return self._store

    def builder(self):
        """The ModelBuilder of the run's store."""
        return self.store.builder

    @contextlib.contextmanager
    def _scratch_next_to(self, out: str | Path):
        """Ancestors rebuilt for an export go next to its output, and are removed after it."""
        parent = Path(out).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        self.store.scratch = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.ancestors-", dir=parent))
        try:
            yield
        finally:
            shutil.rmtree(self.store.scratch, ignore_errors=True)

    def recipe(self, model_id: int) -> ModelRecipe:
        """How to rebuild a model that is not on disk (the run's own recipe), or StateError
        saying why it cannot be."""
        run = self.run
        record = run.models[model_id]
        if record.kind == ModelKind.AGGREGATE and not run.has_archives:
            raise StateError(f"{run.describe(model_id)} has no archives to aggregate yet")
        if record.kind in (ModelKind.BASE, ModelKind.EXPERT):
            raise StateError(f"{run.describe(model_id)} has no recipe to rebuild it from")
        return run.core.recipe(model_id)

    # exports --------------------------------------------------------------------------------

    def model(self, model_id: int, out: str | Path, *, rebuild: bool = False) -> Path:
        """Write model `model_id`: streamed from its dir, or rebuilt from its recipe when it
        has none (or when `rebuild` asks for it, to check a recipe against stored weights)."""
        self.run.check_model(model_id)
        if self.stored_path(model_id) is not None and not rebuild:
            source = self._source(model_id)
            return write_hf_dir(source.tensors(), out, like=source, max_shard_size=self.max_shard_size)
        recipe = self.recipe(model_id)
        with self._scratch_next_to(out):
            return self.builder().write(model_id, recipe, Path(out))

    def elite_id(self, task: str) -> int:
        archives = self.run.stored_archives()
        return archives[self.run.task_index(task)].elite()

    def elite(self, task: str, out: str | Path) -> tuple[int, Path]:
        """Write the elite of task's archive (highest f_task; ties: the most recently inserted)."""
        elite = self.elite_id(task)
        return elite, self.model(elite, out)

    def aggregate_members(self, *, temperature: float = 1.0,
                          weights: Sequence[float] | None = None) -> tuple[list[int], list[float]]:
        """The archives' elites (task order) and their betas: softmax(f_k / T), or `weights`."""
        run = self.run
        if isinstance(run.core.strategy, CoefficientSearch):
            final = [m for m, kind in enumerate(run.kinds) if kind == ModelKind.AGGREGATE]
            where = (f"model #{final[-1]} (export {run.path} --model {final[-1]} OUT)" if final
                     else "written when its final phase starts")
            raise StateError(f"--aggregate merges the archives' elites, as CycleQD and QD end; this is a "
                             f"{run.core.method} run, whose final model is {where}")
        elites = [archive.elite() for archive in run.stored_archives()]
        if weights is not None:
            if len(weights) != run.k:
                raise ConfigError(f"--weights: expected one beta per task ({run.k}: {', '.join(run.task_names)}), "
                                  f"got {len(weights)}")
            betas = [float(w) for w in weights]
            if not all(math.isfinite(b) for b in betas):
                raise ConfigError(f"--weights: expected finite numbers, got {betas}")
            return elites, betas
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"--temperature: expected a number > 0, got {temperature}")
        return elites, run.core.aggregate_betas(temperature)

    def aggregate(self, out: str | Path, *, temperature: float = 1.0,
                  weights: Sequence[float] | None = None) -> tuple[list[int], list[float], Path]:
        """theta_base + sum_k beta_k tau_k over the archives' elites."""
        members, betas = self.aggregate_members(temperature=temperature, weights=weights)
        recipe = ModelRecipe(RecipeKind.AGGREGATE, members=tuple(members), betas=tuple(betas))
        with self._scratch_next_to(out):
            return members, betas, self.builder().write(-1, recipe, Path(out))

    def baseline(self, out: str | Path, spec) -> Path:
        """A TIES / DARE merge (merging/sparse.py `SparseMerge`) of the run's experts."""
        from cqd_mpi.merging.sparse import sparse_merge_stream

        run = self.run
        spec.validate("--", run.k)
        base = self._source(run.core.base_id)
        experts = [self._source(e) for e in run.expert_ids]
        return write_hf_dir(sparse_merge_stream(base=base, members=experts, spec=spec), out, like=base,
                            max_shard_size=self.max_shard_size)


def check_output(out: str | Path, run: RunState, *, force: bool) -> Path:
    """Refuse an output inside the run's own model dirs, a source model dir, or an existing path
    (unless `force`, which replaces an existing dir)."""
    out = Path(out).resolve()
    protected = [run.path.resolve(), run.rundir.models_dir.resolve(), run.rundir.final_dir.resolve()]
    sources = {run.rundir.weights_of(r).resolve() for r in run.models if r.kind in (ModelKind.BASE, ModelKind.EXPERT)}
    if out == protected[0] or any(out == p or p in out.parents for p in protected[1:]) or out in sources:
        raise ConfigError(f"output {out} is part of the run or one of its source models; choose another directory")
    if out.exists():
        if not force:
            raise ConfigError(f"output {out} already exists; choose a new directory or pass --force to replace it")
        if not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "config.json").exists():
            raise ConfigError(f"output {out} is a non-empty directory that is not a model dir; "
                              "--force replaces only model dirs")
    return out

