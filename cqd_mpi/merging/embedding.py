"""Experts that embed the base model: a vision-language model whose language model is the base.

A LLaVA-style checkpoint holds the base's architecture under other names
(`model.language_model.layers.0...` for the base's `model.layers.0...`, or the older
`language_model.model.layers.0...`), with a vision tower and a projector around it, and its
embedding and output matrices may have extra rows (the image token). The run merges and
mutates the language model only, in the base's names and shapes:

- `NameMap` maps names between the two (prefix rules, derived from the directories by
  `derive`, or given in the config's `vision.mapping`);
- `LanguageModelView` shows a vision-language directory as the base would be: its language
  model's tensors under the base's names, an extended matrix cut to the base's rows (a
  prefix of its bytes, so still zero-copy);
- `VisionLayout.lift` turns a model in the base's names back into a complete
  vision-language model: the language model from the stream, the extra rows and every other
  tensor (vision tower, projector) from the one designated vision-language expert (the
  template), whose non-weight files (config, processor, chat template) every written model
  carries.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.checkpoint import DTYPE_NAMES, TensorSpec
from cqd_mpi.merging.modeldir import ModelDir
from cqd_mpi.merging.writer import TensorPiece, TensorStream, write_hf_dir

CHUNK_ELEMENTS = 1 << 21


def is_vision_language(path: str | Path) -> bool:
    """Whether the model dir's config.json describes a vision-language model: a `vision_config`
    beside a `text_config` (LLaVA's layout; SAM has a vision_config and no language model)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and isinstance(config.get("vision_config"), dict)
            and isinstance(config.get("text_config"), dict))


@dataclass(frozen=True)
class NameMap:
    """Prefix rules (vision-language prefix, base prefix); a name matched by none is not the
    language model's (the vision stack)."""

    rules: tuple[tuple[str, str], ...]

    def to_base(self, name: str) -> str | None:
        for vl, base in sorted(self.rules, key=lambda rule: -len(rule[0])):
            if name.startswith(vl):
                return base + name[len(vl):]
        return None

    def to_vl(self, name: str) -> str:
        for vl, base in sorted(self.rules, key=lambda rule: -len(rule[1])):
            if name.startswith(base):
                return vl + name[len(base):]
        raise WeightsError(f"tensor {name!r} of the base matches no rule of the name mapping {self.as_config()}")

    def as_config(self) -> dict[str, str]:
        return dict(self.rules)


def derive(base_names: Iterable[str], vl_names: Iterable[str]) -> NameMap:
    """The prefix rules under which the base's names appear in the vision-language model's.

    Base names are grouped by their first component (`model.`, `lm_head.`); for each group the
    vision-language prefix that, put before the rest of a name, gives the most of the group's
    names is its rule (ties go to a prefix ending in the group's own component, then the
    shortest). A vision tower whose layers share suffixes with the language model's
    (`encoder.layers.0.self_attn.q_proj.weight`) covers fewer names and loses.
    """
    vl_names = list(vl_names)
    by_suffix: dict[str, list[str]] = {}
    for name in vl_names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + ("." if i else ""))
    groups: dict[str, list[str]] = {}
    for name in base_names:
        head, dot, _ = name.partition(".")
        if dot:
            groups.setdefault(head, []).append(name)
    rules = []
    for head, names in groups.items():
        counts: Counter[str] = Counter()
        for name in names:
            counts.update(set(by_suffix.get(name[len(head) + 1:], ())))
        if not counts:
            continue
        best = max(counts, key=lambda prefix: (counts[prefix], prefix.endswith(head + "."), -len(prefix)))
        rules.append((best, head + "."))
    return NameMap(tuple(rules))


def _shape(spec: TensorSpec) -> str:
    return f"{list(spec.shape)} {DTYPE_NAMES.get(spec.dtype, spec.dtype)}"


class LanguageModelView(ModelDir):
    """A vision-language model dir seen as the base: its language model under the base's
    names, extended matrices cut to the base's rows; `source(name)` says where each is read."""

    def __init__(self, vl: ModelDir, names: NameMap, base_layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
        self.path = vl.path
        self.files = vl.files
        self.inner = vl
        self.name_map = names
        self._config = None
        self._sources: dict[str, tuple[str, int | None]] = {}
        self._specs = {}
        for name, (shape, _) in base_layout.items():
            vl_name = names.to_vl(name)
            spec = vl.spec(vl_name)
            rows = None
            if spec.shape != tuple(shape):
                rows = shape[0]
                nbytes = rows * (spec.nbytes // spec.shape[0])
                spec = TensorSpec(shape=tuple(shape), dtype=spec.dtype, file=spec.file, start=spec.start,
                                  end=spec.start + nbytes)
            self._specs[name] = spec
            self._sources[name] = (vl_name, rows)
        self.names = list(base_layout)

    def __repr__(self) -> str:
        return f"LanguageModelView({str(self.path)!r})"

    def source(self, name: str) -> tuple[str, int | None]:
        return self._sources[name]


@dataclass(frozen=True)
class _Check:
    extended: dict[str, int]
    """vision-language name -> the base's rows, for matrices with extra rows"""
    carried: list[str]
    """vision-language names outside the language model"""


def check_embedded(base: ModelDir, vl: ModelDir, names: NameMap) -> _Check:
    """Raise WeightsError naming the first tensor in which `vl`'s language model differs from
    the base (missing, another shape or dtype, a tensor the base lacks); else what is carried."""
    vocab = base.config.get("vocab_size") if isinstance(base.config, dict) else None
    extended: dict[str, int] = {}
    mapping = f"name mapping {names.as_config()}"
    for name in base.names:
        ours = base.spec(name)
        vl_name = names.to_vl(name)
        if vl_name not in vl:
            raise WeightsError(f"tensor {name!r} of the base {base.path} has no counterpart {vl_name!r} in the "
                               f"vision-language model {vl.path} under the {mapping} (set vision.mapping if the "
                               "names map otherwise)")
        theirs = vl.spec(vl_name)
        if theirs.dtype != ours.dtype:
            raise WeightsError(f"tensor {vl_name!r} of {vl.path} is {_shape(theirs)}, the base's {name!r} is "
                               f"{_shape(ours)}: save the vision-language model in the base's dtype")
        if theirs.shape == ours.shape:
            continue
        if (len(ours.shape) == 2 and ours.shape[0] == vocab and theirs.shape[1:] == ours.shape[1:]
                and theirs.shape[0] > ours.shape[0]):
            extended[vl_name] = ours.shape[0]
            continue
        raise WeightsError(f"the language model of {vl.path} is not the base's: its tensor {vl_name!r} is "
                           f"{_shape(theirs)}, the base's {name!r} is {_shape(ours)} (in {ours.file})")
    for vl_name in vl.names:
        mapped = names.to_base(vl_name)
        if mapped is not None and mapped not in base:
            raise WeightsError(f"the language model of {vl.path} is not the base's: its tensor {vl_name!r} would "
                               f"be the base's {mapped!r}, which {base.path} does not have (another layer count?)")
    return _Check(extended, [n for n in vl.names if names.to_base(n) is None])


class VisionLayout:
    """A run whose models are vision-language: the template expert, the name map, the base's layout.

    `view(path)` opens any model of the run in the base's names (a vision-language dir as a
    `LanguageModelView`, a text dir as itself); `lift(stream)` completes a model in the
    base's names into the template's layout; `write_lifted` saves a text model so lifted.
    """

    def __init__(self, *, base: ModelDir, template: ModelDir, mapping: Mapping[str, str] | None = None):
        self.base = base
        self.template = template
        self.names = NameMap(tuple(mapping.items())) if mapping else derive(base.names, template.names)
        checked = check_embedded(base, template, self.names)
        self.extended = checked.extended
        self.carried = checked.carried
        self.base_layout = base.layout()

    def view(self, path: str | Path | ModelDir) -> ModelDir:
        model = path if isinstance(path, ModelDir) else ModelDir(path)
        if not is_vision_language(model.path):
            return model
        check_embedded(self.base, model, self.names)
        return LanguageModelView(model, self.names, self.base_layout)

    def lift(self, stream: TensorStream | Iterable[tuple[str, torch.Tensor]]) -> TensorStream:
        """The complete vision-language model: `stream`'s tensors (the base's names) renamed,
        then the extra rows and the carried tensors from the template."""
        to_vl = self.names.to_vl

        def own() -> Iterator[TensorPiece]:
            if isinstance(stream, TensorStream):
                for name, start, piece in stream.chunks():
                    yield to_vl(name), start, piece
            else:
                for name, tensor in stream:
                    yield to_vl(name), 0, tensor.reshape(-1)

        def pieces(name: str, tensor: torch.Tensor, first: int) -> Iterator[TensorPiece]:
            flat = tensor.reshape(-1)
            for start in range(first, flat.numel(), CHUNK_ELEMENTS):
                yield name, start, flat[start:start + CHUNK_ELEMENTS]

        def extra_rows(name: str | None) -> Iterator[TensorPiece]:
            if name in self.extended:
                for _, tensor in self.template.tensors([name]):
                    yield from pieces(name, tensor, self.extended[name] * (tensor.numel() // tensor.shape[0]))

        def carried() -> Iterator[TensorPiece]:
            for name, tensor in self.template.tensors(self.carried):
                yield from pieces(name, tensor, 0)

        def chunks() -> Iterator[TensorPiece]:
            previous = None
            for name, start, piece in own():
                if name != previous:
                    yield from extra_rows(previous)
                    previous = name
                yield name, start, piece
            yield from extra_rows(previous)
            yield from carried()

        stable = stream.stable_chunks if isinstance(stream, TensorStream) else 1
        order = stream.names if isinstance(stream, TensorStream) else list(self.base_layout)
        if isinstance(stream, TensorStream) and stream.layout != {n: self.base_layout[n] for n in order}:
            raise WeightsError("the stream to complete into a vision-language model does not have the base's layout")
        return TensorStream(layout=self.output([to_vl(n) for n in order]).layout(), chunks=chunks(),
                            stable_chunks=stable)

    def output(self, order: list[str] | None = None) -> ModelDir:
        """The template as every model of the run is streamed: the language model first (in the
        base's order), then the vision stack; what written models are `like`."""
        order = order if order is not None else [self.names.to_vl(n) for n in self.base_layout]
        shown = copy.copy(self.template)
        shown.names = order + self.carried
        return shown

    def write_lifted(self, path: str | Path, out: str | Path) -> Path:
        """Save the model at `path` as a complete vision-language dir (the template's vision stack)."""
        return write_hf_dir(self.lift(self.view(path).tensors()), out, like=self.template)
