"""Reading tensors of memory-mapped safetensors files in bounded resident memory.

`MappedFile` hands out zero-copy views of one file and gives their pages back (`MADV_DONTNEED`)
once consumed; `TensorReader` reads the same names of one or more models together, each shard
opened once, so resident memory stays at the size of the tensors in flight, not of the model.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.checkpoint import SafetensorsFile, TensorSpec


class ShardedModel(Protocol):
    """What `TensorReader` reads from a model: its shard files and where each name is stored
    (`ModelDir` in modeldir.py, and the merge views of merging/embedding.py)."""

    files: list[SafetensorsFile]
    names: list[str]

    def spec(self, name: str) -> TensorSpec: ...

    def source(self, name: str) -> tuple[str, int | None]: ...

_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Callable[[int, int], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    dontneed = getattr(mmap, "MADV_DONTNEED", 4)
    return lambda address, length: madvise(address, length, dontneed)


_madvise_dontneed = _libc_madvise()


def _mapping_of(address: int, path: Path) -> tuple[int, int] | None:
    """The address range of this process's mapping of `path` that contains `address`, if any."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high and fields[5].strip() == target:
                    return low, high
    except OSError:
        return None
    return None


class MappedFile:
    """One safetensors file opened with safetensors' own `safe_open` (a memory mapping).

    `get` returns zero-copy views of the mapping; `drop` gives the pages under a view back to
    the page cache, which lowers this process's resident memory without losing data.
    """

    def __init__(self, file: SafetensorsFile):
        from safetensors import safe_open

        self.file = file
        try:
            self._context = safe_open(str(file.path), framework="pt")
            self._handle = self._context.__enter__()
        except Exception as exc:
            raise WeightsError(f"{file.path} cannot be opened by safetensors: {exc}") from None
        self._mapping: tuple[int, int] | None = None
        self._mapping_known = False

    def get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._handle.get_tensor(name)
        except Exception as exc:
            raise WeightsError(
                f"tensor {name!r} cannot be read from {self.file.path}: {exc}"
            ) from None
        if not self._mapping_known:
            self._mapping_known = True
            if _madvise_dontneed is not None and tensor.numel():
                self._mapping = _mapping_of(tensor.data_ptr(), self.file.path)
        return tensor

    def drop(self, tensor: torch.Tensor) -> bool:
        """Drop the resident pages under `tensor` if it lies in this file's mapping."""
        if self._mapping is None or not tensor.numel():
            return False
        low, high = self._mapping
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not (low <= start and end <= high and tensor.is_contiguous()):
            return False
        page_start = max(low, start - start % _PAGE)
        page_end = min(high, end + (-end) % _PAGE)
        _madvise_dontneed(page_start, page_end - page_start)
        return True

    def close(self) -> None:
        self._mapping = None
        self._context.__exit__(None, None, None)


class TensorReader:
    """Tensors of one or more models with the same tensor names, read together.

    Iterating yields `(name, (tensor_of_model_0, tensor_of_model_1, ...))` in the order of
    `names` (default: the first model's shard order). The tensors are memory-mapped views of
    the files: read them, never write to them. Every shard of every model is opened once,
    when its first tensor is needed, and closed after its last one, even when the models are
    sharded differently. When the next item is asked for, the pages of the previous tensors
    are dropped; `drop(view)` drops the pages of part of a current tensor earlier, for
    chunked work.
    """

    def __init__(self, *, models: Sequence[ShardedModel], names: Iterable[str] | None = None):
        if not models:
            raise ValueError("TensorReader needs at least one model")
        self.models = list(models)
        self.names = list(self.models[0].names if names is None else names)
        for model in self.models:
            for name in self.names:
                model.spec(name)
        self._open: dict[tuple[int, Path], MappedFile] = {}
        self._last_use: dict[tuple[int, Path], int] = {}
        for position, name in enumerate(self.names):
            for m, model in enumerate(self.models):
                self._last_use[(m, model.spec(name).file)] = position
        self._iterated = False

    def __iter__(self) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
        if self._iterated:
            raise RuntimeError("a TensorReader can be iterated once")
        self._iterated = True
        try:
            for position, name in enumerate(self.names):
                tensors = tuple(self._get(m, name) for m in range(len(self.models)))
                yield name, tensors
                for m, tensor in enumerate(tensors):
                    key = (m, self.models[m].spec(name).file)
                    self._open[key].drop(tensor)
                    if self._last_use[key] == position:
                        self._open.pop(key).close()
        finally:
            for shard in self._open.values():
                shard.close()
            self._open.clear()

    def _get(self, m: int, name: str) -> torch.Tensor:
        stored, rows = self.models[m].source(name)
        tensor = self._shard(m, name).get(stored)
        return tensor if rows is None else tensor[:rows]

    def _shard(self, m: int, name: str) -> MappedFile:
        file = self.models[m].spec(name).file
        key = (m, file)
        if key not in self._open:
            shard_file = next(f for f in self.models[m].files if f.path == file)
            self._open[key] = MappedFile(shard_file)
        return self._open[key]

    def drop(self, *views: torch.Tensor) -> None:
        """Drop the resident pages under views of tensors this reader handed out."""
        for view in views:
            for shard in self._open.values():
                if shard.drop(view):
                    break
