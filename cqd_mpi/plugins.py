"""Kinds by name: a config's `kind:` is a built-in name or ``package.module:ClassName``.

Task kinds and engine kinds are both resolved here, so a plug-in of either is named the same
way and fails with the same kind of message.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from cqd_mpi.errors import ConfigError


def load_class(kind: str, *, builtin: Mapping[str, str], base: type, what: str, where: str) -> type:
    """The subclass of `base` that `kind` names: a key of `builtin` or 'module:Class'."""
    target = builtin.get(kind, kind)
    if not isinstance(kind, str) or ":" not in target:
        raise ConfigError(
            f"{where}: unknown {what} kind {kind!r}; expected one of {', '.join(builtin)} "
            "or 'package.module:ClassName'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} for {what} kind {kind!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(
            f"{where}: {target!r} is not a subclass of {base.__module__}.{base.__qualname__} "
            f"(got {type(cls).__name__ if cls is not None else 'nothing'} of that name)"
        )
    return cls
