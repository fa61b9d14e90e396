"""Task kinds by name. A config may also name any Task subclass as ``module.path:ClassName``."""

from __future__ import annotations

from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task, TaskContext

BUILTIN = {
    "skills": "cqd_mpi.tasks.skills:SkillsTask",
    "mbpp": "cqd_mpi.tasks.mbpp:MbppPlusTask",
    "dbbench": "cqd_mpi.tasks.dbbench:DBBenchTask",
    "segmentation": "cqd_mpi.tasks.segmentation:SegmentationTask",
    "os": "cqd_mpi.tasks.os_interaction:OSInteractionTask",
    "textvqa": "cqd_mpi.tasks.textvqa:TextVQATask",
    "lm-eval": "cqd_mpi.tasks.lmeval.task:LmEvalTask",
}

__all__ = ["BUILTIN", "BackendStatus", "ItemResult", "Task", "TaskContext", "task_class"]


def task_class(kind: str, where: str = "kind") -> type[Task]:
    """The Task subclass for a config's `kind:`; built-in name or 'module:Class'."""
    from cqd_mpi.plugins import load_class

    return load_class(kind, builtin=BUILTIN, base=Task, what="task", where=where)
