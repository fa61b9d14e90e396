"""The CycleQD operators on weights, tensor by tensor: crossover, mutation, aggregation, similarity.

Every operator reads memory-mapped models through `weights.TensorReader` and produces a
`weights.TensorStream`, so a child is never held whole. Arithmetic is in float32 and results
are stored in the base model's dtype. Randomness comes from one integer seed per child,
split per tensor by name, so a result does not depend on iteration order or chunking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.merging.mutation import NO_MUTATION, MutationSpec, warn_if_slow_sketch
from cqd_mpi.merging.weights import (
    ModelDir,
    TensorPiece,
    TensorReader,
    TensorStream,
    check_compatible,
)
from cqd_mpi.seeding import derive_seed, torch_generator

CHUNK_ELEMENTS = 1 << 20


@contextmanager
def _one_thread():
    """Run torch ops in this block on this thread alone.

    Used for memory-bound elementwise chunks, which gain little from a second core (a writer
    thread uses it better) and whose per-chunk parallel regions stall badly when another
    process holds the other core, and for small LAPACK calls. The setting is per thread
    (OpenMP), so other threads keep theirs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


FEW_CORES = 2


@contextmanager
def _matrix_pass_threads():
    """Threads for an elementwise pass over a whole matrix that an SVD or update works on.

    One thread where torch has FEW_CORES threads or fewer (the measured best on two cores,
    as `_one_thread` says); all of torch's threads beyond that: on a 16-core node that cut
    the 0.85B rank-64 mutation from 5.9-6.5 s to 3.4-4.6 s (docs/benchmarks.md).
    """
    if torch.get_num_threads() <= FEW_CORES:
        with _one_thread():
            yield
    else:
        yield


@contextmanager
def _lapack_threads():
    """Threads for the randomized SVD's skinny QRs and small SVDs: one. On two cores LAPACK's
    threaded QR of such shapes was several times slower than the serial one; on a 16-core node
    all threads gave the same merge time for about 10% more CPU time (docs/benchmarks.md)."""
    with _one_thread():
        yield


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator for one tensor of one child: keyed by (seed, tensor name), independent of order."""
    return torch_generator(derive_seed(int(seed), 0, f"tensor:{name}"))


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    niter: int = 2,
    generator: torch.Generator,
    sketch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank's algorithm (Halko et al. 2009, alg. 5.1) drawing from `generator`.

    Returns U (m x q), S (q), V (n x q) with q = min(rank, m, n), so matrix ~ U diag(S) V^T.
    Bit-identical to torch.svd_lowrank(matrix, q, niter) after torch.manual_seed of the same seed.

    `sketch`, a lower-precision copy of `matrix` (bfloat16), makes the range finder's products
    run in that precision with float32 accumulation; the orthonormal basis Q, the projection
    Q^T matrix and its SVD stay float32, so U diag(S) V^T is still exactly the float32
    projection of `matrix` onto span(Q). Only the choice of span(Q), itself a randomized
    approximation of the top-q subspace, sees the rounding.
    """
    m, n = matrix.shape
    q = min(rank, m, n)
    transposed = m < n
    a = matrix.mT if transposed else matrix
    if sketch is None:
        sketch = a
    else:
        if sketch.shape != matrix.shape:
            raise ValueError(
                f"sketch: expected shape {tuple(matrix.shape)}, got {tuple(sketch.shape)}"
            )
        sketch = sketch.mT if transposed else sketch
    low = sketch.dtype
    probe = torch.randn(a.shape[-1], q, dtype=a.dtype, generator=generator)
    basis = _orthonormal((sketch @ probe.to(low)).to(a.dtype))
    for _ in range(niter):
        basis = _orthonormal((sketch.mT @ basis.to(low)).to(a.dtype))
        basis = _orthonormal((sketch @ basis.to(low)).to(a.dtype))
    projected = basis.mT @ a
    with _lapack_threads():
        u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    u, v = basis @ u, vh.mT
    if transposed:
        u, v = v, u
    return u, s, v


def _orthonormal(sample: torch.Tensor) -> torch.Tensor:
    """Q of the QR of a tall, skinny matrix, under `_lapack_threads`."""
    with _lapack_threads():
        return torch.linalg.qr(sample).Q


def svd_factors(
    matrix: torch.Tensor,
    rank: Literal["full"] | int,
    *,
    niter: int = 2,
    generator: torch.Generator | None = None,
    sketch: torch.Tensor | None = None,
):
    """U, S, V of a float32 matrix: exact (`rank="full"`) or randomized truncated (`sketch`:
    see randomized_svd; ignored at full rank)."""
    if rank == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u, s, vh.mT
    if generator is None:
        raise ValueError("a truncated SVD needs a generator")
    return randomized_svd(matrix, rank, niter=niter, generator=generator, sketch=sketch)


def add_scaled_components(
    target: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, w: torch.Tensor
) -> None:
    """target += U diag(w * s) V^T, in place, in float32."""
    target.addmm_(u.float() * (w * s.float()), v.float().mT)


class _Buffers:
    """Reused memory for chunked work, so a stream allocates once, not per tensor or chunk.

    Output pieces rotate through RING buffers, so a piece stays valid while the next
    RING - 1 chunks are produced (TensorStream.stable_chunks); a writer thread can then write
    one piece while the next is being computed.
    """

    RING = 4

    def __init__(self):
        self._slots: dict[str, torch.Tensor] = {}
        self._turn = 0

    def _room(self, slot: str, nbytes: int) -> torch.Tensor:
        """The first nbytes of buffer `slot`, grown when too small (the old one freed first)."""
        if slot not in self._slots or self._slots[slot].numel() < nbytes:
            self._slots.pop(slot, None)
            self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._slots[slot][:nbytes]

    def out(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._turn = (self._turn + 1) % self.RING
        return self._room(f"out{self._turn}", numel * dtype.itemsize).view(dtype)

    def scratch(self, numel: int) -> torch.Tensor:
        """Float32 room for widening one 16-bit chunk."""
        return self._room("scratch", numel * 4).view(torch.float32)

    def accumulator(self, numel: int) -> torch.Tensor:
        """Float32 room for summing one chunk."""
        return self._room("accumulator", numel * 4).view(torch.float32)

    def matrix(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, slot: str = "") -> torch.Tensor:
        """Room for one whole matrix, reusing the memory of the previous one of this dtype and
        `slot` (distinct slots are distinct matrices held at once)."""
        room = self._room(f"matrix-{dtype}{slot}", math.prod(shape) * dtype.itemsize)
        return room.view(dtype).view(shape)


def _spans(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    if numel == 0:
        yield 0, 0
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def _emit_float32(
    name: str, values: torch.Tensor, dtype: torch.dtype, buffers: _Buffers, chunk: int
) -> Iterator[TensorPiece]:
    """Chunks of a float32 tensor rounded to `dtype`."""
    flat = values.reshape(-1)
    for start, end in _spans(flat.numel(), chunk):
        out = buffers.out(end - start, dtype)
        with _matrix_pass_threads():
            out.copy_(flat[start:end])
        yield name, start, out


def _lerp_chunks(name, first, second, weight, dtype, buffers, reader, chunk) -> Iterator[TensorPiece]:
    """Chunks of lerp(first, second, weight) = (1 - weight) first + weight second.

    For 16-bit inputs torch computes lerp in float32 and rounds once (equal to
    lerp(first.float(), second.float(), weight).to(dtype); tests/test_operators.py checks it).
    """
    a, b = first.reshape(-1), second.reshape(-1)
    for start, end in _spans(a.numel(), chunk):
        out = buffers.out(end - start, dtype)
        with _one_thread():
            torch.lerp(a[start:end], b[start:end], weight, out=out)
        reader.drop(a[start:end], b[start:end])
        yield name, start, out


def _combination_into(
    target: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor]],
    reader: TensorReader,
    buffers: _Buffers,
    chunk: int,
) -> None:
    """target (float32) = sum of coefficient * tensor, chunk by chunk, under
    `_matrix_pass_threads` (inside `_one_thread`, as in `_linear_chunks`, that is one thread).

    16-bit terms are widened into a float32 scratch chunk first: mixed-dtype kernels are
    about 1.5x slower than a widening copy plus a float32 one.
    """
    flat = target.reshape(-1)
    views = [(c, t.reshape(-1)) for c, t in terms]
    for start, end in _spans(flat.numel(), chunk):
        piece = flat[start:end]
        with _matrix_pass_threads():
            _accumulate(piece, [(c, t[start:end]) for c, t in views], buffers)
        reader.drop(*(t[start:end] for _, t in views))


def _accumulate(piece: torch.Tensor, terms, buffers: _Buffers) -> None:
    """piece = sum of coefficient * term; a first term that is `piece` itself is not copied."""
    for i, (c, t) in enumerate(terms):
        if i == 0:
            if t.data_ptr() != piece.data_ptr():
                piece.copy_(t)
            if c != 1.0:
                piece.mul_(c)
        elif t.dtype == torch.float32:
            piece.add_(t, alpha=c)
        else:
            wide = buffers.scratch(t.numel())
            wide.copy_(t)
            piece.add_(wide, alpha=c)


def _linear_chunks(name, terms, dtype, buffers, reader, chunk) -> Iterator[TensorPiece]:
    """Chunks of sum of coefficient * tensor, accumulated in float32, stored in `dtype`."""
    numel = terms[0][1].numel()
    for start, end in _spans(numel, chunk):
        piece = buffers.accumulator(end - start)
        with _one_thread():
            _combination_into(
                piece,
                [(c, t.reshape(-1)[start:end]) for c, t in terms],
                reader,
                buffers,
                end - start,
            )
            out = buffers.out(end - start, dtype)
            out.copy_(piece)
        yield name, start, out


def crossover_stream(
    *,
    base: ModelDir,
    parent1: ModelDir,
    parent2: ModelDir,
    w1: float,
    w2: float,
    mutation: MutationSpec = NO_MUTATION,
    seed: int = 0,
    basis=None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> TensorStream:
    """The child theta_base + c1 tau_p1 + c2 tau_p2 (c_i = w_i / (w1 + w2)), then mutated.

    The base cancels: the child is lerp(p1, p2, c2), one fused float32 pass per tensor. An SVD
    mutation works on tau_child = child - base in float32; `basis` (a basis.ExpertBasis) is
    required for `mutation.basis == "expert"`. The same arguments give byte-identical tensors.
    """
    if abs(w1 + w2) < 1e-6:
        raise ValueError(f"crossover weights must not sum to ~0, got w1={w1}, w2={w2}")
    mutation.validate("mutation")
    check_compatible(base, [parent1, parent2])
    svd_kind = mutation.kind == "svd"
    if svd_kind and mutation.basis == "child":
        warn_if_slow_sketch(mutation)
    if svd_kind and mutation.basis == "expert":
        if basis is None:
            raise ConfigError(
                "mutation.basis is 'expert', but no expert basis was given (see basis.ensure_expert_basis)"
            )
        basis.check_covers(base, mutation)
    c2 = w2 / (w1 + w2)
    c1 = 1.0 - c2
    layout = base.layout()
    models = [parent1, parent2, base]

    def chunks() -> Iterator[TensorPiece]:
        buffers = _Buffers()
        reader = TensorReader(models=models, names=base.names)
        for name, tensors in reader:
            p1, p2 = tensors[:2]
            shape, dtype = layout[name]
            if not dtype.is_floating_point:
                yield from _copy_chunks(name, tensors[2], buffers, chunk_elements)
                continue
            if mutation.mutates_svd(name, shape, dtype):
                if mutation.basis == "child":
                    yield from _svd_mutated_chunks(
                        name,
                        tensors,
                        (c1, c2),
                        dtype,
                        mutation,
                        seed,
                        reader,
                        buffers,
                        chunk_elements,
                    )
                    continue
                child = _expert_mutated_child(
                    name, p1, p2, c1, c2, mutation, seed, basis, reader, buffers, chunk_elements
                )
                yield from _emit_float32(name, child, dtype, buffers, chunk_elements)
            elif mutation.kind == "gaussian" and not mutation.excludes(name):
                child = buffers.matrix(shape)
                _combination_into(child, [(c1, p1), (c2, p2)], reader, buffers, chunk_elements)
                noise = torch.randn(
                    shape, generator=tensor_generator(seed, name), dtype=torch.float32
                )
                child.add_(noise, alpha=mutation.sigma)
                del noise
                yield from _emit_float32(name, child, dtype, buffers, chunk_elements)
            else:
                yield from _lerp_chunks(name, p1, p2, c2, dtype, buffers, reader, chunk_elements)

    return TensorStream(layout=layout, chunks=chunks(), stable_chunks=_Buffers.RING - 1)


def _copy_chunks(name, tensor, buffers, chunk) -> Iterator[TensorPiece]:
    flat = tensor.reshape(-1)
    for start, end in _spans(flat.numel(), chunk):
        out = buffers.out(end - start, tensor.dtype)
        with _one_thread():
            out.copy_(flat[start:end])
        yield name, start, out


def _svd_mutated_chunks(
    name, tensors, coefficients, dtype, mutation, seed, reader, buffers, chunk
) -> Iterator[TensorPiece]:
    """Chunks of base + tau' rounded to `dtype`, tau' = tau + U diag(w s) V^T from the SVD of
    tau = child - base, all in float32. The last pass adds the base and rounds in one kernel."""
    p1, p2, base = tensors
    c1, c2 = coefficients
    tau = buffers.matrix(p1.shape)
    _combination_into(tau, [(c1, p1), (c2, p2), (-1.0, base)], reader, buffers, chunk)
    sketch = None
    if mutation.sketch is not None:
        sketch = buffers.matrix(tau.shape, mutation.sketch)
        with _matrix_pass_threads():
            sketch.copy_(tau)
    generator = tensor_generator(seed, name)
    u, s, v = svd_factors(
        tau, mutation.rank, niter=mutation.niter, generator=generator, sketch=sketch
    )
    w = torch.rand(s.shape[0], generator=generator, dtype=torch.float32) * mutation.w_max
    add_scaled_components(tau, u, s, v, w)
    del u, s, v
    flat, base_flat = tau.reshape(-1), base.reshape(-1)
    for start, end in _spans(flat.numel(), chunk):
        out = buffers.out(end - start, dtype)
        with _matrix_pass_threads():
            torch.add(flat[start:end], base_flat[start:end], out=out)
        reader.drop(base_flat[start:end])
        yield name, start, out


def _expert_mutated_child(
    name, p1, p2, c1, c2, mutation, seed, basis, reader, buffers, chunk
) -> torch.Tensor:
    """child + U diag(w s) V^T in float32, with U, S, V the cached SVD of the expert's task vector."""
    child = buffers.matrix(p1.shape)
    _combination_into(child, [(c1, p1), (c2, p2)], reader, buffers, chunk)
    u, s, v = basis.factors(name)
    generator = tensor_generator(seed, name)
    w = torch.rand(s.shape[0], generator=generator, dtype=torch.float32) * mutation.w_max
    add_scaled_components(child, u, s, v, w)
    basis.drop(u, s, v)
    return child


def aggregate_stream(
    *,
    base: ModelDir,
    members: Sequence[ModelDir],
    betas: Sequence[float],
    chunk_elements: int = CHUNK_ELEMENTS,
) -> TensorStream:
    """theta_base + sum_k beta_k tau_k.

    Computed as (1 - sum beta) theta_base + sum_k beta_k theta_k in float32, so the base is
    not read at all when the betas sum to 1 (softmax weights).
    """
    if not members:
        raise ConfigError("aggregation needs at least one member model")
    if len(betas) != len(members):
        raise ConfigError(f"aggregation: {len(members)} member models but {len(betas)} weights")
    betas = [float(b) for b in betas]
    if not all(math.isfinite(b) for b in betas):
        raise ConfigError(f"aggregation weights must be finite, got {betas}")
    check_compatible(base, list(members))
    base_weight = 1.0 - math.fsum(betas)
    use_base = abs(base_weight) > 1e-12
    models = [*members, base]
    coefficients = [*betas, base_weight] if use_base else betas
    layout = base.layout()

    def chunks() -> Iterator[TensorPiece]:
        buffers = _Buffers()
        reader = TensorReader(models=models, names=base.names)
        for name, tensors in reader:
            dtype = layout[name][1]
            if not dtype.is_floating_point:
                yield from _copy_chunks(name, tensors[-1], buffers, chunk_elements)
                continue
            yield from _linear_chunks(
                name, list(zip(coefficients, tensors)), dtype, buffers, reader, chunk_elements
            )

    return TensorStream(layout=layout, chunks=chunks(), stable_chunks=_Buffers.RING - 1)


def model_similarity(
    *, base: ModelDir, a: ModelDir, b: ModelDir, exclude: Sequence[str] = ()
) -> float:
    """Mean over 2-D matrices of cos(s_A, s_B), the singular values of the two task vectors.

    A matrix where both task vectors are zero counts as 1 (identical); where only one is, as 0.
    """
    check_compatible(base, [a, b])
    names = [
        name
        for name in base.names
        if len(base.spec(name).shape) == 2
        and base.spec(name).dtype.is_floating_point
        and not any(re.search(p, name) for p in exclude)
    ]
    if not names:
        raise WeightsError(f"{base.path} has no 2-D floating-point matrices to compare")
    total = 0.0
    for _, (tb, ta, tc) in TensorReader(models=[base, a, b], names=names):
        base32 = tb.float()
        s_a = torch.linalg.svdvals(ta.float() - base32).double()
        s_b = torch.linalg.svdvals(tc.float() - base32).double()
        norm = float(s_a.norm() * s_b.norm())
        if norm == 0.0:
            total += 1.0 if float(s_a.norm()) == float(s_b.norm()) else 0.0
        else:
            total += float(s_a @ s_b) / norm
    return total / len(names)
