"""Model directories: a Hugging Face directory's safetensors weights, validated up front, and
the check that experts share the base's tensor names, shapes and dtypes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.checkpoint import (
    _PICKLE_CHECKPOINTS,
    DTYPE_NAMES,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsFile,
    TensorSpec,
    _describe_spec,
)
from cqd_mpi.merging.mapped import TensorReader


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

    def source(self, name: str) -> tuple[str, int | None]:
        """Where tensor `name` is read: its name in the files, and the leading rows taken (None: all).
        The same name here; a view of another model under other names says otherwise."""
        return name, None

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
