"""Taking models out of a run as Hugging Face dirs: any model by id, an archive's elite, or
the aggregate with the run's betas or others.

A model whose weights are on disk (base, experts, archive members, the final aggregate) is
streamed from its dir. One that is not is rebuilt from its recipe in /models, which is
deterministic: a child from its parents, crossover weights and mutation seed (only while both
parents are still available), the naive average and the aggregate from their members. The
default aggregate (temperature 1) uses the same elites and the same softmax as the run, so
it reproduces RUN_DIR/final byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from cqd_mpi import schema
from cqd_mpi.analysis.runstate import RunState
from cqd_mpi.errors import ConfigError, StateError
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from cqd_mpi.qd.cycleqd import ModelRecipe, softmax
from cqd_mpi.run.config import MutationConfig


class Exporter:
    """Writes models of one run (a `RunState` snapshot) as HF dirs."""

    def __init__(self, run: RunState, *, max_shard_size: str | int | None = None):
        self.run = run
        runtime = self._config().get("runtime") or {}
        self.max_shard_size = max_shard_size or runtime.get("max_shard_size") or "5GB"
        self._builder = None

    def _config(self) -> dict:
        text = self.run.config_text
        if not text and self.run.rundir.config_path.exists():
            text = self.run.rundir.config_path.read_text()
        try:
            data = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as exc:
            raise StateError(f"{self.run.source}: the frozen config is not valid YAML: {exc}") from None
        return data if isinstance(data, dict) else {}

    # where weights are ------------------------------------------------------------------------

    def stored_path(self, model_id: int) -> Path | None:
        """The dir holding the model's weights, or None when the run has none for it."""
        run = self.run
        kind = run.kinds[model_id]
        path = str(run.models["path"][model_id])
        if kind in ("base", "expert"):
            return run.rundir.resolve(path)
        if kind == "child" and bool(run.models["saved"][model_id]) and path:
            return run.rundir.resolve(path)
        if kind == "aggregate" and bool(run.models["saved"][model_id]) and run.phase == "done":
            return run.rundir.resolve(path)
        return None

    def _source(self, model_id: int) -> ModelDir:
        path = self.stored_path(model_id)
        if path is None:
            raise StateError(f"{self.run.describe(model_id)} has no weights on disk")
        if not path.is_dir():
            raise StateError(f"the weights of {self.run.describe(model_id)} should be in {path}, which is missing "
                             "(a run in progress may have removed them after the checkpoint that was read)")
        return ModelDir(path)

    def builder(self):
        """A ModelBuilder configured like the run (mutation settings from its frozen config)."""
        if self._builder is None:
            from cqd_mpi.merging.builder import ModelBuilder

            config = self._config()
            mutation = schema.build(MutationConfig, (config.get("qd") or {}).get("mutation") or {}, "qd.mutation")
            runtime = config.get("runtime") or {}
            run = self.run
            self._builder = ModelBuilder(
                base_path=run.rundir.resolve(str(run.models["path"][0])),
                expert_paths=[str(run.rundir.resolve(str(run.models["path"][e]))) for e in run.expert_ids],
                model_path=lambda m: self._source(m).path, resolve=run.rundir.resolve, mutation=mutation,
                basis_cache=runtime.get("basis_cache"), max_shard_size=self.max_shard_size)
        return self._builder

    def recipe(self, model_id: int) -> ModelRecipe:
        """How to rebuild a model that is not on disk, or StateError saying why it cannot be."""
        run = self.run
        kind = run.kinds[model_id]
        if kind == "child":
            p1, p2 = run.parents(model_id)
            missing = sorted({p for p in (p1, p2) if self.stored_path(p) is None})
            if missing:
                gone = ", ".join(run.describe(p) for p in missing)
                raise StateError(
                    f"{run.describe(model_id)} is not saved: it left every archive (or never entered one), so "
                    f"its weights were deleted. It can be rebuilt from its recipe only while both parents are "
                    f"available, but {gone} {'is' if len(missing) == 1 else 'are'} not saved either.")
            return ModelRecipe("crossover", parents=(p1, p2),
                          weights=(float(run.models["w1"][model_id]), float(run.models["w2"][model_id])),
                          active_task=int(run.models["active_task"][model_id]),
                          mutation_seed=int(run.models["mutation_seed"][model_id]))
        if kind == "average":
            return ModelRecipe("aggregate", members=tuple(run.expert_ids), betas=(1.0 / run.k,) * run.k)
        if kind == "aggregate":
            members, betas = self.aggregate_members()
            return ModelRecipe("aggregate", members=tuple(members), betas=tuple(betas))
        raise StateError(f"{run.describe(model_id)} has no recipe to rebuild it from")

    # exports --------------------------------------------------------------------------------

    def model(self, model_id: int, out: str | Path, *, rebuild: bool = False) -> Path:
        """Write model `model_id`: streamed from its dir, or rebuilt from its recipe when it
        has none (or when `rebuild` asks for it, to check a recipe against stored weights)."""
        self.run.check_model(model_id)
        if self.stored_path(model_id) is not None and not rebuild:
            source = self._source(model_id)
            return write_hf_dir(source.tensors(), out, like=source, max_shard_size=self.max_shard_size)
        return self.builder().write(self.recipe(model_id), Path(out))

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
        qualities = [run.scores[e][k] for k, e in enumerate(elites)]
        return elites, [float(b) for b in np.asarray(softmax(qualities, temperature))]

    def aggregate(self, out: str | Path, *, temperature: float = 1.0,
                  weights: Sequence[float] | None = None) -> tuple[list[int], list[float], Path]:
        """theta_base + sum_k beta_k tau_k over the archives' elites."""
        members, betas = self.aggregate_members(temperature=temperature, weights=weights)
        recipe = ModelRecipe("aggregate", members=tuple(members), betas=tuple(betas))
        return members, betas, self.builder().write(recipe, Path(out))


def check_output(out: str | Path, run: RunState, *, force: bool) -> Path:
    """Refuse an output inside the run's own model dirs, a source model dir, or an existing path
    (unless `force`, which replaces an existing dir)."""
    out = Path(out).resolve()
    protected = [run.path.resolve(), run.rundir.models_dir.resolve(), run.rundir.final_dir.resolve()]
    sources = {run.rundir.resolve(str(p)).resolve() for p, kind in zip(run.models["path"], run.kinds)
               if kind in ("base", "expert") and p}
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

