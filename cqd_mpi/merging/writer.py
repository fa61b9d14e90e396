"""Streamed Hugging Face directories out: `TensorStream` is a model produced tensor by tensor, and
`write_hf_dir` streams one into a directory that `transformers` loads, writing each chunk at its
final offset in the shard files (headers first, from the known layout), atomically."""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cqd_mpi import faults
from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.checkpoint import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, non_weight_files
from cqd_mpi.merging.modeldir import ModelDir
from cqd_mpi.schema import parse_size

DEFAULT_MAX_SHARD_SIZE = "5GB"


TensorPiece = tuple[str, int, torch.Tensor]


class TensorStream:
    """A model produced tensor by tensor, with its layout (names, shapes, dtypes) known up front.

    Iterating yields `(name, tensor)` with a new tensor per name, in layout order.
    `chunks()` yields `(name, start, piece)`: `piece` is a flat run of the tensor's elements
    that begins at element `start`; it lives in a reused buffer, so it stays valid only while
    the next `stable_chunks` chunks are produced. This is what writers and transports use to
    move a model without ever holding all of it. A stream can be consumed once, either way.
    """

    def __init__(
        self,
        *,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        chunks: Iterable[TensorPiece],
        stable_chunks: int = 1,
    ):
        self.layout = dict(layout)
        self.stable_chunks = stable_chunks
        self._chunks = chunks
        self._consumed = False

    @property
    def names(self) -> list[str]:
        return list(self.layout)

    def chunks(self) -> Iterator[TensorPiece]:
        if self._consumed:
            raise RuntimeError("a TensorStream can be consumed once")
        self._consumed = True
        yield from self._chunks

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        current: str | None = None
        tensor = flat = None
        filled = 0
        for name, start, piece in self.chunks():
            if name != current:
                if current is not None:
                    yield current, tensor
                shape, dtype = self.layout[name]
                tensor = torch.empty(shape, dtype=dtype)
                flat = tensor.view(-1)
                current, filled = name, 0
            flat[start : start + piece.numel()].copy_(piece)
            filled += piece.numel()
        if current is not None:
            yield current, tensor


@dataclass
class _PlannedShard:
    filename: str
    names: list[str]
    offsets: dict[str, int]
    header: bytes
    size: int


def _plan_shards(
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    max_shard_size: int,
    metadata: Mapping[str, str] | None = None,
) -> list[_PlannedShard]:
    """Split tensors into shards as transformers does: in order, a new shard when one would overflow."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    shards = []
    for i, group in enumerate(groups):
        ordered = sorted(group, key=lambda n: -layout[n][1].itemsize)
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offsets, position = {}, 0
        for name in ordered:
            shape, dtype = layout[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [position, position + nbytes],
            }
            offsets[name] = position
            position += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        prefix = struct.pack("<Q", len(raw)) + raw
        offsets = {name: len(prefix) + offset for name, offset in offsets.items()}
        filename = (
            SINGLE_FILE
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        shards.append(
            _PlannedShard(
                filename=filename,
                names=ordered,
                offsets=offsets,
                header=prefix,
                size=len(prefix) + position,
            )
        )
    return shards


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class _ShardWriter:
    """Writes tensors into planned safetensors files at their final offsets."""

    def __init__(self, *, directory: Path, shards: list[_PlannedShard], layout):
        self.layout = layout
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._remaining = {
            name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in layout.items()
        }
        for shard in shards:
            fd = os.open(directory / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(shard.header), 0)
            os.ftruncate(fd, shard.size)
            for name in shard.names:
                self._where[name] = (fd, shard.offsets[name])

    def write(self, name: str, start: int, piece: torch.Tensor) -> None:
        if name not in self.layout:
            raise WeightsError(
                f"the stream produced tensor {name!r}, which the output layout does not have"
            )
        shape, dtype = self.layout[name]
        if piece.dtype != dtype:
            raise WeightsError(
                f"tensor {name!r}: expected dtype {DTYPE_NAMES[dtype]}, the stream produced {piece.dtype}"
            )
        itemsize = dtype.itemsize
        if start < 0 or start + piece.numel() > math.prod(shape):
            raise WeightsError(
                f"tensor {name!r}: chunk [{start}, {start + piece.numel()}) lies outside its {math.prod(shape)} elements"
            )
        fd, offset = self._where[name]
        data = _as_bytes(piece.contiguous())
        if len(data) > self._remaining[name]:
            raise WeightsError(
                f"the stream produced more data for tensor {name!r} than its {list(shape)} elements"
            )
        _pwrite_all(fd, data, offset + start * itemsize)
        self._remaining[name] -= len(data)

    def check_complete(self) -> None:
        missing = [name for name, left in self._remaining.items() if left != 0]
        if missing:
            raise WeightsError(
                f"the stream ended without writing all of tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def close(self, *, durable: bool) -> None:
        for fd in self._fds:
            if durable:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()


def write_hf_dir(
    stream: TensorStream | Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    like: ModelDir,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    durable: bool = False,
) -> Path:
    """Write a model as a Hugging Face directory that transformers loads; returns its path.

    The layout (names, shapes, dtypes, order) is that of `like`; every tensor must arrive
    exactly once, in any order. Shards are named as transformers names them, with
    model.safetensors.index.json when there is more than one. Every non-weight file of `like`
    (`non_weight_files`: config, tokenizer, preprocessor and generation configs...) is copied. The directory is
    built next to `out_dir` and renamed into place only when complete, replacing an existing
    one; `durable=True` also fsyncs the files before the rename.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"output {out_dir} exists and is not a directory")
    layout = {name: (like.spec(name).shape, like.spec(name).dtype) for name in like.names}
    if isinstance(stream, TensorStream) and stream.layout != layout:
        different = next(
            (n for n in set(layout) | set(stream.layout) if layout.get(n) != stream.layout.get(n)),
            None,
        )
        raise WeightsError(
            f"the stream's tensor {different!r} is {stream.layout.get(different)}, but {like.path} has {layout.get(different)}"
        )
    shards = _plan_shards(layout, parse_size(max_shard_size, "max_shard_size", minimum=1))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        temp.chmod(0o755)
        writer = _ShardWriter(directory=temp, shards=shards, layout=layout)
        try:
            faults.point("save-model", temp / shards[0].filename)
            _consume(stream, writer)
        finally:
            writer.close(durable=durable)
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(shard.size - len(shard.header) for shard in shards),
                    "total_parameters": sum(math.prod(shape) for shape, _ in layout.values()),
                },
                "weight_map": {name: shard.filename for shard in shards for name in shard.names},
            }
            (temp / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        for source in non_weight_files(like.path):
            shutil.copyfile(source, temp / source.name)
        _replace_dir(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def _write_overlapped(stream: TensorStream, writer: _ShardWriter) -> None:
    """Write chunks on a second thread while the next ones are computed on this one."""
    pending: queue.Queue = queue.Queue(maxsize=stream.stable_chunks - 1)
    failures: list[BaseException] = []

    def drain() -> None:
        while (item := pending.get()) is not None:
            if not failures:
                try:
                    writer.write(*item)
                except BaseException as exc:
                    failures.append(exc)

    thread = threading.Thread(target=drain, name="cqd-writer", daemon=True)
    thread.start()
    try:
        for item in stream.chunks():
            if failures:
                break
            pending.put(item)
    finally:
        pending.put(None)
        thread.join()
    if failures:
        raise failures[0]


def _consume(
    stream: TensorStream | Iterable[tuple[str, torch.Tensor]], writer: _ShardWriter
) -> None:
    if isinstance(stream, TensorStream) and stream.stable_chunks >= 2:
        _write_overlapped(stream, writer)
    elif isinstance(stream, TensorStream):
        for name, start, piece in stream.chunks():
            writer.write(name, start, piece)
    else:
        for name, tensor in stream:
            expected = writer.layout.get(name, (None,))[0]
            if expected is not None and tuple(tensor.shape) != expected:
                raise WeightsError(
                    f"tensor {name!r}: expected shape {list(expected)}, the stream produced {list(tensor.shape)}"
                )
            writer.write(name, 0, tensor)
    writer.check_complete()


def write_safetensors(
    stream: TensorStream, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a stream into one safetensors file, atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (shard,) = _plan_shards(stream.layout, sys.maxsize, metadata)
    handle, temp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    temp = Path(temp)
    try:
        shard.filename = temp.name
        writer = _ShardWriter(directory=temp.parent, shards=[shard], layout=stream.layout)
        try:
            _consume(stream, writer)
        finally:
            writer.close(durable=False)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
