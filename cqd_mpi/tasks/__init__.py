"""Task kinds by name. A config may also name any Task subclass as ``module.path:ClassName``."""

from __future__ import annotations

import importlib

from cqd_mpi.errors import ConfigError
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task, TaskContext

BUILTIN = {
    "skills": "cqd_mpi.tasks.skills:SkillsTask",
    "mbpp": "cqd_mpi.tasks.mbpp:MbppPlusTask",
    "dbbench": "cqd_mpi.tasks.dbbench:DBBenchTask",
}

__all__ = ["BUILTIN", "BackendStatus", "ItemResult", "Task", "TaskContext", "task_class"]


def task_class(kind: str, where: str = "kind") -> type[Task]:
    """The Task subclass for a config's `kind:`; built-in name or 'module:Class'."""
    target = BUILTIN.get(kind, kind)
    if ":" not in target:
        raise ConfigError(
            f"{where}: unknown task kind {kind!r}; expected one of {', '.join(BUILTIN)} "
            "or 'package.module:ClassName'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r} for task kind {kind!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"{where}: {target!r} is not a cqd_mpi Task subclass")
    return cls
