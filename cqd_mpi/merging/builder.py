"""Turning a job's recipe into a stream of (name, tensor): a stored dir, a crossover child, an aggregate.

The builder is the only place that knows where a model id's weights live (the base and the
experts where the user keeps them, children under RUN_DIR/models) and how the config's
mutation settings map onto the operators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cqd_mpi.merging import operators
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from cqd_mpi.qd.cycleqd import ModelRecipe
from cqd_mpi.run.config import MutationConfig

log = logging.getLogger("cqd_mpi.merging.builder")
NamedTensors = Iterator[tuple[str, torch.Tensor]]


def mutation_spec(config: MutationConfig) -> operators.MutationSpec:
    return operators.MutationSpec(kind=config.kind, basis=config.basis, rank=config.rank,
                                  w_max=config.w_max, sigma=config.sigma, exclude=list(config.exclude),
                                  niter=config.niter, sketch_dtype=config.sketch_dtype)


class ModelBuilder:
    """Builds models of one run from their recipes.

    `model_path(id)` gives the directory of a stored model (base, expert, saved child) and
    `resolve(path)` turns a path from the state (absolute, or relative to the run dir) into
    a directory; `expert_paths[k]` is task k's expert, whose SVD basis the `expert`
    mutation basis uses.
    """

    def __init__(self, *, base_path: str | Path, expert_paths: list[str],
                 model_path: Callable[[int], Path], resolve: Callable[[str], Path],
                 mutation: MutationConfig,
                 basis_cache: str | Path | None = None, max_shard_size: str | int = "5GB"):
        self.base = ModelDir(base_path)
        self.expert_paths = [Path(p) for p in expert_paths]
        self.model_path = model_path
        self.resolve = resolve
        self.mutation = mutation_spec(mutation)
        self.basis_cache = Path(basis_cache) if basis_cache else None
        self.max_shard_size = max_shard_size
        self._bases: dict[int, object] = {}

    def check(self) -> None:
        """Validate every expert against the base before any work starts."""
        from cqd_mpi.merging.weights import check_compatible

        check_compatible(self.base, [ModelDir(p) for p in self.expert_paths])

    def _basis(self, task: int):
        if self.mutation.kind != "svd" or self.mutation.basis != "expert":
            return None
        if task not in self._bases:
            from cqd_mpi.merging import basis

            cache = self.basis_cache or Path.home() / ".cache" / "cqd_mpi" / "svd-basis"
            path = basis.ensure_expert_basis(
                base=self.base, expert=ModelDir(self.expert_paths[task]), rank=self.mutation.rank,
                cache_dir=cache, exclude=list(self.mutation.exclude), niter=self.mutation.niter,
                sketch_dtype=self.mutation.sketch_dtype)
            self._bases[task] = basis.ExpertBasis(path)
        return self._bases[task]

    def stream(self, recipe: ModelRecipe) -> NamedTensors:
        if recipe.kind == "dir":
            return ModelDir(self.resolve(recipe.path)).tensors()
        if recipe.kind == "crossover":
            p1, p2 = (ModelDir(self.model_path(p)) for p in recipe.parents)
            w1, w2 = recipe.weights
            return operators.crossover_stream(
                base=self.base, parent1=p1, parent2=p2, w1=w1, w2=w2, mutation=self.mutation,
                seed=recipe.mutation_seed, basis=self._basis(recipe.active_task))
        if recipe.kind == "aggregate":
            members = [ModelDir(self.model_path(m)) for m in recipe.members]
            return operators.aggregate_stream(base=self.base, members=members, betas=list(recipe.betas))
        raise ValueError(f"unknown recipe kind {recipe.kind!r}")

    def write(self, recipe: ModelRecipe, out_dir: Path) -> Path:
        """Build the model again (deterministically) and save it as an HF dir."""
        return write_hf_dir(self.stream(recipe), out_dir, like=self.base, max_shard_size=self.max_shard_size)
