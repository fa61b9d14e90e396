"""TIES and DARE: task arithmetic over sparsified task vectors, the merging baselines that
researchers compare against, on the streaming merge layer.

For members k = 1..K with task vectors tau_k = theta_k - theta_base and weights w_k, per
floating-point tensor, in float32:

- sparsify (`trim`):
  - "magnitude" (TIES, Yadav et al. 2023): keep the m = floor(density * n) entries of largest
    magnitude of each tau_k (every entry at least as large as the m-th largest), zero the rest;
  - "random" (DARE, Yu et al. 2024): keep each entry with probability `density` and rescale
    the kept ones by 1 / density (drop rate p = 1 - density), zero the rest;
- combine:
  - "sign" (TIES's elect and disjoint merge): gamma = sign(sum_k w_k tau_k'); the merged
    vector is sum_k w_k tau_k' [sign tau_k' = gamma] / sum_k w_k [sign tau_k' = gamma], and 0
    where no member agrees (with equal weights: the mean of the agreeing entries);
  - "sum" (task arithmetic): sum_k w_k tau_k';
- theta = theta_base + scale * merged, stored in the base's dtype.

Method "ties" is magnitude + sign, "dare" is random + sum, "dare-ties" random + sign, as
mergekit names them. The trim is per tensor, as mergekit does it (the TIES paper's code
takes one threshold over the whole flattened task vector). Weights default to 1/K, so
"dare" at density 1 is the naive task-vector average. Memory: K + 2 float32 copies of the
largest tensor, whatever the model's size. The random masks come from one generator per
(seed, tensor name, member), drawn for the whole tensor, so the result does not depend on
the chunk size or the order of tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.operators import (
    CHUNK_ELEMENTS,
    _Buffers,
    _combination_into,
    _copy_chunks,
    _one_thread,
    _spans,
    tensor_generator,
)
from cqd_mpi.merging.weights import (
    ModelDir,
    TensorPiece,
    TensorReader,
    TensorStream,
    check_compatible,
)

METHODS = {"ties": ("magnitude", "sign"), "dare": ("random", "sum"), "dare-ties": ("random", "sign")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseMerge:
    """A TIES / DARE merge: `method` (ties, dare, dare-ties), the fraction of each task vector
    kept (`density`), the merged vector's `scale` (lambda), per-member `weights` (None: 1/K
    each) and the `seed` of DARE's random masks."""

    method: str
    density: float = 0.2
    scale: float = 1.0
    weights: tuple[float, ...] | None = None
    seed: int = 0

    def validate(self, where: str = "merge", n_members: int | None = None) -> SparseMerge:
        """Raise ConfigError naming the key (`where`.density, or --density for where "--")."""
        if self.method not in METHODS:
            raise ConfigError(f"{_key(where, 'method')}: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise ConfigError(f"{_key(where, 'density')}: expected a number in (0, 1], got {self.density!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ConfigError(f"{_key(where, 'scale')}: expected a finite number, got {self.scale!r}")
        if self.weights is not None:
            if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in self.weights):
                raise ConfigError(f"{_key(where, 'weights')}: expected finite numbers, got {list(self.weights)}")
            if n_members is not None and len(self.weights) != n_members:
                raise ConfigError(f"{_key(where, 'weights')}: expected one weight per member model ({n_members}), "
                                  f"got {len(self.weights)}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"{_key(where, 'seed')}: expected an integer >= 0, got {self.seed!r}")
        return self

    @property
    def trim(self) -> str:
        return METHODS[self.method][0]

    @property
    def combine(self) -> str:
        return METHODS[self.method][1]

    def member_weights(self, n_members: int) -> list[float]:
        if self.weights is None:
            return [1.0 / n_members] * n_members
        return [float(w) for w in self.weights]


def _key(where: str, name: str) -> str:
    return f"--{name}" if where == "--" else f"{where}.{name}"


def kept_count(numel: int, density: float) -> int:
    """How many entries the magnitude trim keeps at least: floor(density * n)."""
    return min(numel, math.floor(density * numel + 1e-9))


def mask_generator(seed: int, name: str, member: int) -> torch.Generator:
    """The generator of DARE's mask for one member's tensor: keyed by (seed, name, member)."""
    return tensor_generator(seed, f"{name}#member{member}")


def sparse_merge_stream(*, base: ModelDir, members: Sequence[ModelDir], spec: SparseMerge,
                        chunk_elements: int = CHUNK_ELEMENTS) -> TensorStream:
    """theta_base + scale * merge(sparsify(tau_1..tau_K)) as a stream in the base's layout and dtype."""
    if not members:
        raise ConfigError("a TIES / DARE merge needs at least one member model")
    spec.validate("merge", len(members))
    check_compatible(base, list(members))
    weights = spec.member_weights(len(members))
    layout = base.layout()
    models = [*members, base]

    def chunks() -> Iterator[TensorPiece]:
        buffers = _Buffers()
        reader = TensorReader(models=models, names=base.names)
        for name, tensors in reader:
            shape, dtype = layout[name]
            if not dtype.is_floating_point:
                yield from _copy_chunks(name, tensors[-1], buffers, chunk_elements)
                continue
            base_tensor = tensors[-1]
            taus = []
            for k, member in enumerate(tensors[:-1]):
                tau = buffers.matrix(shape, slot=f"tau{k}")
                _combination_into(tau, [(1.0, member), (-1.0, base_tensor)], reader, buffers, chunk_elements)
                _sparsify(tau, name, k, spec, buffers, chunk_elements)
                taus.append(tau)
            yield from _merged_chunks(name, base_tensor, taus, weights, spec, dtype, buffers, reader,
                                      chunk_elements)

    return TensorStream(layout=layout, chunks=chunks(), stable_chunks=_Buffers.RING - 1)


def _sparsify(tau: torch.Tensor, name: str, member: int, spec: SparseMerge, buffers: _Buffers,
              chunk: int) -> None:
    """Trim one task vector in place."""
    flat = tau.reshape(-1)
    n = flat.numel()
    if n == 0 or spec.density >= 1.0:
        return
    helper = buffers.matrix((n,), slot="helper")
    if spec.trim == "magnitude":
        m = kept_count(n, spec.density)
        if m == 0:
            flat.zero_()
            return
        with _one_thread():
            torch.abs(flat, out=helper)
        threshold = float(torch.kthvalue(helper, n - m + 1).values)
        for start, end in _spans(n, chunk):
            piece = flat[start:end]
            with _one_thread():
                piece.masked_fill_(helper[start:end] < threshold, 0.0)
        return
    torch.rand(n, generator=mask_generator(spec.seed, name, member), dtype=torch.float32, out=helper)
    rescale = 1.0 / spec.density
    for start, end in _spans(n, chunk):
        piece = flat[start:end]
        with _one_thread():
            piece.masked_fill_(helper[start:end] >= spec.density, 0.0)
            piece.mul_(rescale)


def _merged_chunks(name, base_tensor, taus, weights, spec, dtype, buffers, reader, chunk) -> Iterator[TensorPiece]:
    base_flat = base_tensor.reshape(-1)
    flats = [t.reshape(-1) for t in taus]
    for start, end in _spans(base_flat.numel(), chunk):
        size = end - start
        merged = buffers.accumulator(size)
        with _one_thread():
            pieces = [f[start:end] for f in flats]
            _weighted_sum(merged, pieces, weights, buffers)
            if spec.combine == "sign":
                _disjoint_mean(merged, pieces, weights, buffers)
            out = buffers.out(size, dtype)
            wide = buffers.scratch(size)
            wide.copy_(base_flat[start:end])
            wide.add_(merged, alpha=spec.scale)
            out.copy_(wide)
        reader.drop(base_flat[start:end])
        yield name, start, out


def _weighted_sum(merged: torch.Tensor, pieces: Sequence[torch.Tensor], weights: Sequence[float],
                  buffers: _Buffers) -> None:
    """merged = sum_k w_k piece_k, each product rounded before it is added: a fused
    multiply-add would leave a rounding residue where two members' terms cancel exactly,
    and TIES would then elect a sign where the sum is zero."""
    term = buffers.matrix((merged.numel(),), slot="term")
    merged.zero_()
    for w, piece in zip(weights, pieces):
        torch.mul(piece, w, out=term)
        merged.add_(term)


def _disjoint_mean(merged: torch.Tensor, pieces: Sequence[torch.Tensor], weights: Sequence[float],
                   buffers: _Buffers) -> None:
    """merged (on entry: the weighted sum, whose sign is elected) becomes the weighted mean of
    the entries that agree with the elected sign, 0 where none does."""
    size = merged.numel()
    elected = torch.sign(merged)
    numerator = buffers.matrix((size,), slot="numerator")
    denominator = buffers.matrix((size,), slot="denominator")
    numerator.zero_()
    denominator.zero_()
    for w, piece in zip(weights, pieces):
        agree = (torch.sign(piece) == elected) & (piece != 0)
        numerator.add_(torch.where(agree, piece * w, 0.0))
        denominator.add_(torch.where(agree, w, 0.0))
    torch.div(numerator, denominator, out=merged)
    merged.masked_fill_(denominator == 0, 0.0)
