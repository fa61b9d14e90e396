"""Engines by name: the live model a worker holds (engines/base.py has the contract).

A config names an engine as ``engine.kind``: a built-in name below or any Engine subclass
as ``package.module:ClassName``. Engine modules are imported only when their kind is used,
so an optional engine's dependencies are needed only by the runs that use it.
"""

from __future__ import annotations

import os
from typing import Any

from cqd_mpi.engines.base import (
    Capability,
    Engine,
    LogLikelihoods,
    MaskPrediction,
    MaskPrompt,
    PredictedMask,
    TextGeneration,
    VisualQuestionAnswering,
    capabilities,
)

BUILTIN = {
    "transformers": "cqd_mpi.engines.hf:TransformersEngine",
    "sam": "cqd_mpi.engines.sam:SamEngine",
    "vllm": "cqd_mpi.engines.vllm:VLLMEngine",
    "llava": "cqd_mpi.engines.llava:LlavaEngine",
}

__all__ = ["BUILTIN", "Capability", "Engine", "LogLikelihoods", "MaskPrediction", "MaskPrompt", "PredictedMask",
           "TextGeneration", "VisualQuestionAnswering", "capabilities", "create", "engine_class"]


def engine_class(kind: str, where: str = "engine.kind") -> type[Engine]:
    """The Engine subclass for a config's `engine.kind`: a built-in name or 'module:Class'."""
    from cqd_mpi.plugins import load_class

    return load_class(kind, builtin=BUILTIN, base=Engine, what="engine", where=where)


def create(kind: str, model_dir: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
           settings: dict[str, Any] | None = None) -> Engine:
    """Build the engine of `kind` on `model_dir`, its `settings` mapping checked by the schema."""
    from cqd_mpi import schema

    cls = engine_class(kind)
    built = schema.build(cls.Settings, settings or {}, "engine.settings")
    return cls(model_dir, device=device, dtype=dtype, settings=built)
