"""Memory-mapped safetensors model directories in, streamed Hugging Face directories out.

Reading: `ModelDir` validates a directory's safetensors files and index up front, and
`TensorReader` hands out tensors of one or more models (memory-mapped, zero-copy) in the
first model's shard order. Each shard is opened once; once a tensor has been consumed its
pages are dropped from the process (`MADV_DONTNEED`), so resident memory stays at the size
of the tensors in flight, not of the model.

Writing: `TensorStream` is a model produced tensor by tensor, and `write_hf_dir` streams one
into a directory that `transformers` loads, writing each chunk at its final offset in the
shard files (headers first, from the known layout), atomically.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import queue
import re
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cqd_mpi import faults
from cqd_mpi.errors import WeightsError
from cqd_mpi.schema import parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

_PICKLE_CHECKPOINTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
_WEIGHT_FILES = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)|model\.safetensors\.index\.json"
    r"|.*\.(bin|safetensors)\.index\.json",
    re.IGNORECASE,
)
"""Weight files of any framework: never copied from `like` into a written model."""


def non_weight_files(model_dir: Path) -> list[Path]:
    """The regular files at the top of a model dir that are not weights (config, tokenizer,
    processor and generation configs, chat templates, README...), which every model written
    `like` it carries too. Sub-directories and hidden files are left out."""
    return [entry for entry in sorted(model_dir.iterdir())
            if entry.is_file() and not entry.name.startswith(".") and not _WEIGHT_FILES.fullmatch(entry.name)]


_MAX_HEADER_BYTES = 100_000_000
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: its shape and dtype, the file, and its byte range in that file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _describe_spec(spec: TensorSpec) -> str:
    return f"shape {list(spec.shape)} {DTYPE_NAMES.get(spec.dtype, spec.dtype)}"


class SafetensorsFile:
    """One safetensors file, its header parsed and checked against the file size."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise WeightsError(
                        f"{self.path} is truncated: a safetensors file starts with an 8-byte header "
                        f"length, but the file has {size} bytes"
                    )
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(size - 8, _MAX_HEADER_BYTES):
                    raise WeightsError(
                        f"{self.path} is not a valid safetensors file or is truncated: its header "
                        f"claims {header_len} bytes, but the file has {size} bytes"
                    )
                raw = handle.read(header_len)
        except FileNotFoundError:
            raise WeightsError(f"{self.path} is missing") from None
        except IsADirectoryError:
            raise WeightsError(f"{self.path} is a directory, expected a safetensors file") from None
        except OSError as exc:
            raise WeightsError(f"{self.path} cannot be read: {exc}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{self.path} has a corrupt safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise WeightsError(
                f"{self.path} has a corrupt safetensors header: expected a JSON object"
            )
        self.data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        data_end = 0
        for name, entry in header.items():
            spec = self._parse_entry(name, entry)
            data_end = max(data_end, spec.end - self.data_start)
            self.specs[name] = spec
        if self.data_start + data_end > size:
            raise WeightsError(
                f"{self.path} is truncated: its header needs {self.data_start + data_end} bytes, "
                f"the file has {size}"
            )
        self.size = size
        self.names = sorted(self.specs, key=lambda n: self.specs[n].start)

    def _parse_entry(self, name: str, entry) -> TensorSpec:
        where = f"tensor {name!r} in {self.path}"
        if not isinstance(entry, dict):
            raise WeightsError(f"{where}: expected a header entry object, got {entry!r}")
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise WeightsError(
                f"{where}: unknown dtype {entry.get('dtype')!r}; expected one of {', '.join(DTYPES)}"
            )
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WeightsError(
                f"{where}: expected a list of non-negative ints as shape, got {shape!r}"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise WeightsError(f"{where}: expected data_offsets [begin, end], got {offsets!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise WeightsError(
                f"{where}: shape {shape} {entry['dtype']} needs {nbytes} bytes, but data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}"
            )
        return TensorSpec(
            shape=tuple(shape),
            dtype=dtype,
            file=self.path,
            start=self.data_start + offsets[0],
            end=self.data_start + offsets[1],
        )


class ModelDir:
    """A Hugging Face model directory holding safetensors weights, validated on construction."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise WeightsError(f"{self.path} is a file, not a model directory")
        if not self.path.is_dir():
            raise WeightsError(f"model directory {self.path} does not exist")
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.exists():
            self.files = [SafetensorsFile(single)]
        elif index.exists():
            self.files = self._read_index(index)
        else:
            pickles = [n for n in _PICKLE_CHECKPOINTS if (self.path / n).exists()]
            if pickles:
                raise WeightsError(
                    f"{self.path} holds only a non-safetensors checkpoint ({', '.join(pickles)}); "
                    f"cqd_mpi reads {SINGLE_FILE} or {INDEX_FILE} with its shards. Re-save the model "
                    "with transformers' save_pretrained(dir, safe_serialization=True)"
                )
            raise WeightsError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._specs: dict[str, TensorSpec] = {}
        for shard in self.files:
            for name in shard.names:
                self._specs[name] = shard.specs[name]
        self.names: list[str] = [name for shard in self.files for name in shard.names]
        self._config: dict | None = None

    def _read_index(self, index: Path) -> list[SafetensorsFile]:
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"index {index} cannot be parsed: {exc}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(
                f"index {index}: expected a non-empty 'weight_map' object mapping tensor names to shard files"
            )
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file or Path(file).name != file:
                raise WeightsError(
                    f"index {index}: tensor {name!r} maps to {file!r}, expected a shard file name in {self.path}"
                )
        shards = []
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).exists():
                raise WeightsError(f"shard {self.path / file} listed in index {index} is missing")
            shards.append(SafetensorsFile(self.path / file))
        for shard in shards:
            for name in shard.names:
                listed = weight_map.get(name)
                if listed != shard.path.name:
                    raise WeightsError(
                        f"tensor {name!r} is stored in {shard.path}, but index {index} "
                        + (f"maps it to {listed}" if listed else "does not list it")
                    )
        by_file = {shard.path.name: shard for shard in shards}
        for name, file in weight_map.items():
            if name not in by_file[file].specs:
                raise WeightsError(
                    f"tensor {name!r} is listed in index {index} for {self.path / file}, but that file does not contain it"
                )
        return shards

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise WeightsError(f"tensor {name!r} is not in {self.path}") from None

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self._specs.values())

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every tensor, in `names` order: what a stream of this
        model's shape declares up front (TensorStream.layout)."""
        return {name: (tuple(self._specs[name].shape), self._specs[name].dtype) for name in self.names}

    @property
    def config(self) -> dict:
        """config.json as a dict."""
        if self._config is None:
            path = self.path / "config.json"
            try:
                self._config = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise WeightsError(f"{path} is missing") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise WeightsError(f"{path} cannot be parsed: {exc}") from None
        return self._config

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)`, memory-mapped, in shard order; see `TensorReader`."""
        if names is not None:
            wanted = set(names)
            for name in wanted:
                self.spec(name)
            names = [name for name in self.names if name in wanted]
        for name, (tensor,) in TensorReader(models=[self], names=names):
            yield name, tensor


def check_compatible(base: ModelDir, others: Sequence[ModelDir]) -> None:
    """Raise WeightsError unless every model has the base's tensor names, shapes and dtypes."""
    for other in others:
        missing = [name for name in base.names if name not in other]
        if missing:
            raise WeightsError(
                f"tensor {missing[0]!r} of {base.spec(missing[0]).file} is missing from {other.path}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = [name for name in other.names if name not in base]
        if extra:
            raise WeightsError(
                f"tensor {extra[0]!r} of {other.spec(extra[0]).file} is not in the base model {base.path}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name in base.names:
            ours, theirs = base.spec(name), other.spec(name)
            if ours.shape != theirs.shape:
                raise WeightsError(
                    f"tensor {name!r} has {_describe_spec(ours)} in {ours.file} but "
                    f"{_describe_spec(theirs)} in {theirs.file}"
                )
        retyped = [name for name in base.names if base.spec(name).dtype != other.spec(name).dtype]
        if retyped:
            ours, theirs = base.spec(retyped[0]), other.spec(retyped[0])
            raise WeightsError(
                f"tensor {retyped[0]!r} has dtype {DTYPE_NAMES.get(ours.dtype, ours.dtype)} in {ours.file} but "
                f"dtype {DTYPE_NAMES.get(theirs.dtype, theirs.dtype)} in {theirs.file} (same shape "
                f"{list(ours.shape)})" + (f"; {len(retyped) - 1} more tensors differ in dtype" if len(retyped) > 1 else "")
                + f"; every model must have the base's dtypes: save {other.path} in them"
            )


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

    def __init__(self, *, models: Sequence[ModelDir], names: Iterable[str] | None = None):
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
                tensors = tuple(self._shard(m, name).get(name) for m in range(len(self.models)))
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
