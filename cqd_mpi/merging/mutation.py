"""How a child is mutated after crossover: the one definition of the mutation's settings.

`MutationSpec` is both the config's `qd.mutation` section (built and checked by
cqd_mpi.schema, errors naming the key) and what the operators take, so its defaults and its
validation exist once. Kept free of torch at import, so loading a config stays light.
"""

from __future__ import annotations

import platform
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cqd_mpi import cpu
from cqd_mpi.errors import ConfigError

if TYPE_CHECKING:
    import torch

SKETCH_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class MutationSpec:
    """How a child is mutated after crossover.

    kind: "svd" (scale the principal components of each matrix's task vector by 1 + w_i,
    w ~ U[0, w_max]^r), "gaussian" (add N(0, sigma^2) to every element) or "none".
    basis: "child" (SVD of the child's own task vector) or "expert" (a cached SVD of the
    active task's expert, see basis.py). rank: "full" or r (randomized truncated SVD with
    `niter` subspace iterations, as torch.svd_lowrank). sketch_dtype: the precision of the
    truncated SVD's range finder (its 2 niter + 1 products with the matrix); the projection,
    the factors and the update stay float32 (see `operators.randomized_svd`). "bfloat16" pays
    where the CPU multiplies bf16 much faster than float32 and the products dominate (a fifth
    off the rank-64 mutation on 2 AVX512-BF16 cores; nothing on a 16-core AMX node): measure
    with benchmarks/bench_merge.py. exclude: regexes; a matching tensor name is not mutated.

    `validate(where)` checks the values (schema.build calls it for a config; the operators
    call it before they use a spec).
    """

    kind: Literal["svd", "gaussian", "none"] = "svd"
    basis: Literal["child", "expert"] = "child"
    rank: int | Literal["full"] = "full"
    w_max: float = 0.3
    sigma: float = 0.001
    exclude: tuple[str, ...] = field(default_factory=tuple)
    niter: int = 2
    sketch_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def validate(self, where: str = "mutation") -> MutationSpec:
        """Raise ConfigError naming `where`'s key for a bad value; returns the spec."""
        if self.kind not in ("svd", "gaussian", "none"):
            raise ConfigError(f"{where}.kind: expected 'svd', 'gaussian' or 'none', got {self.kind!r}")
        if self.basis not in ("child", "expert"):
            raise ConfigError(f"{where}.basis: expected 'child' or 'expert', got {self.basis!r}")
        if self.rank != "full" and not (
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0
        ):
            raise ConfigError(f"{where}.rank: expected 'full' or a positive integer, got {self.rank!r}")
        if not (isinstance(self.w_max, (int, float)) and self.w_max >= 0):
            raise ConfigError(f"{where}.w_max: expected a number >= 0, got {self.w_max!r}")
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise ConfigError(f"{where}.sigma: expected a number >= 0, got {self.sigma!r}")
        if not (isinstance(self.niter, int) and not isinstance(self.niter, bool) and self.niter >= 0):
            raise ConfigError(f"{where}.niter: expected an integer >= 0, got {self.niter!r}")
        if self.sketch_dtype not in SKETCH_DTYPES:
            raise ConfigError(
                f"{where}.sketch_dtype: expected 'float32' or 'bfloat16', got {self.sketch_dtype!r}"
            )
        for i, pattern in enumerate(self.exclude):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"{where}.exclude[{i}]: invalid regular expression {pattern!r}: {exc}") from None
        return self

    @property
    def sketch(self) -> torch.dtype | None:
        """The dtype a truncated SVD's range finder works in, where it is not float32."""
        if self.rank == "full" or self.sketch_dtype == "float32":
            return None
        import torch

        return getattr(torch, self.sketch_dtype)

    def excludes(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.exclude)

    def mutates_svd(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Whether this tensor gets an SVD mutation: a floating-point 2-D matrix not excluded."""
        return (
            self.kind == "svd"
            and len(shape) == 2
            and dtype.is_floating_point
            and not self.excludes(name)
        )


NO_MUTATION = MutationSpec(kind="none")


def warn_if_slow_sketch(spec: MutationSpec) -> None:
    """Warn (once per call site) when a bf16 sketch is asked for on a CPU that lacks bf16
    dot products, where it makes the mutation many times slower instead of faster."""
    if spec.sketch_dtype == "bfloat16" and spec.rank != "full" and cpu.native_bf16_matmul() is False:
        warnings.warn(
            "mutation.sketch_dtype is 'bfloat16', but this CPU "
            f"({platform.machine()}) has no bf16 dot-product instructions (avx512_bf16, amx_bf16 "
            "or Arm bf16 in /proc/cpuinfo): its bf16 products run tens of times slower than "
            "float32 ones here. Use sketch_dtype: float32 on this node.",
            RuntimeWarning,
            stacklevel=3,
        )
