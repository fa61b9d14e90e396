"""Turning a job's recipe into a stream of (name, tensor): a stored model, a crossover child, an aggregate.

The builder is the one place that maps a recipe onto the operators: where a model id's
weights live comes from the caller (`model_path`), how a child is mutated from the run's
`qd.mutation` (a `MutationSpec`), and the expert bases from the basis cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cqd_mpi import locations
from cqd_mpi.merging import operators
from cqd_mpi.merging.embedding import VisionLayout
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.weights import ModelDir, TensorStream, check_compatible, write_hf_dir
from cqd_mpi.qd.records import ModelRecipe, RecipeKind

log = logging.getLogger("cqd_mpi.merging.builder")


class ModelBuilder:
    """Builds the models of one run from their recipes.

    `model_path(id)` is the directory of a stored model (the base, an expert, a saved child);
    `expert_paths[k]` is task k's expert, whose SVD basis the `expert` mutation basis uses.
    With `vision`, every stored model is a vision-language dir: the merge sees its language
    model in the base's names, and every built model is completed into the vision layout.
    """

    def __init__(self, *, base_path: str | Path, expert_paths: list[str],
                 model_path: Callable[[int], Path], mutation: MutationSpec,
                 basis_cache: str | Path | None = None, max_shard_size: str | int = "5GB",
                 vision: VisionLayout | None = None):
        self.vision = vision
        self.base = self._open(base_path)
        self.output = vision.output() if vision is not None else self.base
        """What every built model is streamed and written like (the base, or the vision-language layout)."""
        self.expert_paths = [Path(p) for p in expert_paths]
        self.model_path = model_path
        self.mutation = mutation.validate("qd.mutation")
        self.basis_cache = locations.basis_cache(basis_cache)
        self.max_shard_size = max_shard_size
        self._bases: dict[int, object] = {}

    def _open(self, path: str | Path) -> ModelDir:
        """A stored model in the base's names (a vision-language one as its language model)."""
        return self.vision.view(path) if self.vision is not None else ModelDir(path)

    def _finish(self, stream):
        """A built model in the output's layout (completed into a vision-language model)."""
        return self.vision.lift(stream) if self.vision is not None else stream

    def check(self) -> None:
        """Validate every expert against the base before any work starts."""
        check_compatible(self.base, [self._open(p) for p in self.expert_paths])

    def _basis(self, task: int):
        if self.mutation.kind != "svd" or self.mutation.basis != "expert":
            return None
        if task not in self._bases:
            from cqd_mpi.merging import basis

            path = basis.ensure_expert_basis(
                base=self.base, expert=self._open(self.expert_paths[task]), rank=self.mutation.rank,
                cache_dir=self.basis_cache, exclude=list(self.mutation.exclude), niter=self.mutation.niter,
                sketch_dtype=self.mutation.sketch_dtype)
            self._bases[task] = basis.ExpertBasis(path)
        return self._bases[task]

    def stream(self, model_id: int, recipe: ModelRecipe) -> TensorStream | Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors; `model_id` is the model a "stored" recipe refers to."""
        if recipe.kind == RecipeKind.STORED:
            return self._finish(self._open(self.model_path(model_id)).tensors())
        if recipe.kind == RecipeKind.CROSSOVER:
            p1, p2 = (self._open(self.model_path(p)) for p in recipe.parents)
            w1, w2 = recipe.weights
            return self._finish(operators.crossover_stream(
                base=self.base, parent1=p1, parent2=p2, w1=w1, w2=w2, mutation=self.mutation,
                seed=recipe.mutation_seed, basis=self._basis(recipe.active_task)))
        if recipe.kind == RecipeKind.AGGREGATE:
            members = [self._open(self.model_path(m)) for m in recipe.members]
            return self._finish(operators.aggregate_stream(base=self.base, members=members, betas=list(recipe.betas)))
        raise ValueError(f"unknown recipe kind {recipe.kind!r}")

    def write(self, model_id: int, recipe: ModelRecipe, out_dir: Path) -> Path:
        """Build the model (again, deterministically) and save it as an HF dir."""
        return write_hf_dir(self.stream(model_id, recipe), out_dir, like=self.output,
                            max_shard_size=self.max_shard_size)
