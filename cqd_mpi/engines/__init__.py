"""Live models that tasks generate with. `hf.LiveModel`: a transformers causal LM, weights swapped in place.

Import-light: transformers is loaded only when `LiveModel` is first used.
"""

from __future__ import annotations

__all__ = ["LiveModel"]


def __getattr__(name: str):
    if name == "LiveModel":
        from cqd_mpi.engines.hf import LiveModel

        return LiveModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
