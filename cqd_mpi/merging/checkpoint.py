"""Safetensors headers: the dtypes, where each tensor lies in its file, and which files are weights.

`SafetensorsFile` parses and checks one file's header against the file's size; `TensorSpec` is
one tensor's shape, dtype and byte range. Nothing here reads tensor data (mapped.py does).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cqd_mpi.errors import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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
