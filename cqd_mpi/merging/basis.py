"""The cached SVD basis of an expert's task vector, for `mutation.basis: expert`.

For every 2-D matrix, tau = theta_expert - theta_base = U diag(S) V^T is computed once per
(base, expert, rank) and stored as one safetensors file (`<name>.U`, `<name>.S`, `<name>.V`),
which crossovers then read memory-mapped. A truncated basis (rank r) holds r (m + n + 1)
float32 numbers per m x n matrix, a few percent of the model; a full one is stored in the
model's 16-bit dtype, where rounding the factors costs far less than rounding the child.
The cache key covers both directories' files (path, size, mtime), so a changed expert is
never served a stale basis.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.merging.mutation import MutationSpec, warn_if_slow_sketch
from cqd_mpi.merging.operators import svd_factors, tensor_generator
from cqd_mpi.merging.weights import (
    MappedFile,
    ModelDir,
    SafetensorsFile,
    TensorReader,
    TensorStream,
    check_compatible,
    write_safetensors,
)

FORMAT = "cqd_mpi.expert_basis.v1"
FACTORS = ("U", "S", "V")


def _fingerprint(model: ModelDir) -> list:
    return [str(model.path.resolve())] + [
        [f.path.name, f.path.stat().st_size, f.path.stat().st_mtime_ns] for f in model.files
    ]


def basis_names(base: ModelDir, exclude: Sequence[str] = ()) -> list[str]:
    """The matrices a basis covers: the base's 2-D floating-point tensors not excluded."""
    spec = MutationSpec(kind="svd", exclude=tuple(exclude)).validate()
    return [n for n in base.names if spec.mutates_svd(n, base.spec(n).shape, base.spec(n).dtype)]


def expert_basis_path(
    *,
    base: ModelDir,
    expert: ModelDir,
    rank: Literal["full"] | int,
    cache_dir: str | os.PathLike,
    exclude: Sequence[str] = (),
    niter: int = 2,
    sketch_dtype: str = "float32",
) -> Path:
    """Where the basis for these arguments is cached (it may not exist yet)."""
    spec = MutationSpec(
        kind="svd", rank=rank, exclude=tuple(exclude), niter=niter, sketch_dtype=sketch_dtype
    ).validate()
    fields = {
        "format": FORMAT,
        "base": _fingerprint(base),
        "expert": _fingerprint(expert),
        "rank": rank,
        "niter": niter,
        "exclude": list(exclude),
    }
    if spec.sketch is not None:
        fields["sketch_dtype"] = sketch_dtype
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"basis-{expert.path.resolve().name}-r{rank}-{digest}.safetensors"


def ensure_expert_basis(
    *,
    base: ModelDir,
    expert: ModelDir,
    rank: Literal["full"] | int,
    cache_dir: str | os.PathLike,
    exclude: Sequence[str] = (),
    niter: int = 2,
    sketch_dtype: str = "float32",
) -> Path:
    """The path of the cached basis of expert - base, computing and writing it first if missing.

    `sketch_dtype` is the truncated SVD's range-finder precision (MutationSpec.sketch_dtype);
    a full-rank basis ignores it."""
    path = expert_basis_path(
        base=base,
        expert=expert,
        rank=rank,
        cache_dir=cache_dir,
        exclude=exclude,
        niter=niter,
        sketch_dtype=sketch_dtype,
    )
    if path.exists():
        try:
            ExpertBasis(path).close()
            return path
        except WeightsError:
            path.unlink()
    check_compatible(base, [expert])
    names = basis_names(base, exclude)
    if not names:
        raise WeightsError(f"{base.path} has no 2-D floating-point matrices to build a basis from")
    layout = {}
    for name in names:
        m, n = base.spec(name).shape
        q = min(m, n) if rank == "full" else min(rank, m, n)
        dtype = (
            base.spec(name).dtype
            if rank == "full" and base.spec(name).dtype.itemsize == 2
            else torch.float32
        )
        layout[f"{name}.U"] = ((m, q), dtype)
        layout[f"{name}.S"] = ((q,), torch.float32)
        layout[f"{name}.V"] = ((n, q), dtype)

    sketch_spec = MutationSpec(kind="svd", rank=rank, sketch_dtype=sketch_dtype).validate()
    warn_if_slow_sketch(sketch_spec)
    low = sketch_spec.sketch

    def chunks() -> Iterator[tuple[str, int, torch.Tensor]]:
        for name, (tensor, base_tensor) in TensorReader(models=[expert, base], names=names):
            tau = tensor.float() - base_tensor.float()
            sketch = None if low is None else tau.to(low)
            factors = svd_factors(
                tau, rank, niter=niter, generator=tensor_generator(0, name), sketch=sketch
            )
            del tau, sketch
            for label, factor in zip(FACTORS, factors):
                key = f"{name}.{label}"
                yield key, 0, factor.to(layout[key][1]).contiguous()

    metadata = {
        "cqd_mpi": FORMAT,
        "base": str(base.path.resolve()),
        "expert": str(expert.path.resolve()),
        "rank": str(rank),
        "niter": str(niter),
        "sketch_dtype": "float32" if low is None else sketch_dtype,
        "exclude": json.dumps(list(exclude)),
    }
    return write_safetensors(TensorStream(layout=layout, chunks=chunks()), path, metadata=metadata)


class ExpertBasis:
    """A cached expert basis, memory-mapped: `factors(name)` gives U, S, V of one matrix."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = SafetensorsFile(self.path)
        meta = self._file.metadata
        if meta.get("cqd_mpi") != FORMAT:
            raise WeightsError(
                f"{self.path} is not an expert basis file ({FORMAT}); its metadata is {meta}"
            )
        self.rank: Literal["full"] | int = (
            "full" if meta.get("rank") == "full" else int(meta.get("rank", 0))
        )
        self.names = sorted({key.rsplit(".", 1)[0] for key in self._file.specs})
        for name in self.names:
            for label in FACTORS:
                if f"{name}.{label}" not in self._file.specs:
                    raise WeightsError(f"expert basis {self.path} lacks {name}.{label}")
        self._shard: MappedFile | None = None

    def check_covers(self, base: ModelDir, mutation: MutationSpec) -> None:
        """Raise unless this basis has factors of the right shapes for every matrix the mutation touches."""
        if mutation.rank != self.rank:
            raise ConfigError(
                f"mutation.rank is {mutation.rank!r}, but the expert basis {self.path} has rank {self.rank!r}"
            )
        for name in base.names:
            spec = base.spec(name)
            if not mutation.mutates_svd(name, spec.shape, spec.dtype):
                continue
            if f"{name}.U" not in self._file.specs:
                raise WeightsError(
                    f"expert basis {self.path} has no factors for tensor {name!r} of {spec.file}"
                )
            m, n = spec.shape
            u, v = self._file.specs[f"{name}.U"].shape, self._file.specs[f"{name}.V"].shape
            if u[0] != m or v[0] != n:
                raise WeightsError(
                    f"expert basis {self.path}: factors of {name!r} are for a {u[0]}x{v[0]} matrix, "
                    f"but {spec.file} has {m}x{n}"
                )

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._shard is None:
            self._shard = MappedFile(self._file)
        if f"{name}.U" not in self._file.specs:
            raise WeightsError(f"expert basis {self.path} has no factors for tensor {name!r}")
        return tuple(self._shard.get(f"{name}.{label}") for label in FACTORS)

    def drop(self, *tensors: torch.Tensor) -> None:
        """Drop the resident pages of factors that have been used."""
        if self._shard is not None:
            for tensor in tensors:
                self._shard.drop(tensor)

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def __enter__(self) -> ExpertBasis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
