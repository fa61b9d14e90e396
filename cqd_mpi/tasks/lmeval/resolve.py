"""Find an lm-eval task (or group) by name with lm-eval's own TaskManager, and check it.

Everything a user can get wrong is refused here, when the config is loaded, in one line
naming the key: an unknown name (with lm-eval's closest names), a YAML in `include_path`
that lm-eval rejects (its message and the file), a missing data file, a dataset that needs
the network on an offline node, a metric that is not a per-document mean in [0, 1].
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from pathlib import Path
from typing import Any

from cqd_mpi.errors import ConfigError
from cqd_mpi.tasks.lmeval import require

OFFLINE_HINT = ("fetch it on a node with network access into a shared HF_DATASETS_CACHE (run the same config "
                "there, or datasets.load_dataset), then run with HF_DATASETS_CACHE set to it and "
                "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1")


@dataclasses.dataclass
class Resolved:
    """One configured lm-eval task: its leaf tasks by name, and what scores an item."""

    name: str
    tasks: dict[str, Any]
    groups: dict[str, Any]
    metric: str
    filter: str
    output_types: frozenset[str]

    def doc_ids(self) -> list[tuple[str, int]]:
        """(leaf task, lm-eval doc id) of every document, in a fixed order."""
        return [(name, doc_id) for name, task in self.tasks.items() for doc_id in range(len(task.eval_docs))]


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, name: str):
    """lm-eval's TaskManager: the include_path alone when it holds `name` (fast), else with
    lm-eval's own tasks indexed too (several seconds), once per process."""
    lm_eval = require()
    if include_path:
        local = lm_eval.tasks.TaskManager(include_defaults=False, include_path=include_path)
        if name in local.all_tasks:
            return local
    return lm_eval.tasks.TaskManager(include_path=include_path)


def _rejected_yamls(include_path: str) -> list[str]:
    """The YAMLs in include_path that lm-eval's loader refuses, each with lm-eval's message."""
    from lm_eval.tasks._yaml_loader import load_yaml

    rejected = []
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as exc:  # lm-eval raises anything from yaml, OSError to its own checks
            rejected.append(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return rejected


def _explain_load_error(exc: BaseException, name: str, where: str, source: str) -> ConfigError:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    missing = exc if isinstance(exc, FileNotFoundError) else None
    if missing is not None or "Unable to find" in text or "doesn't exist" in text:
        return ConfigError(f"{where}.task: the data of lm-eval task {name!r} ({source}) is missing: {text}")
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    network = ("offline" in text.lower() or "connection" in text.lower() or "couldn't reach" in text.lower()
               or ("resolve" in text.lower() and "huggingface" in text.lower()))
    if network or (offline and "ConnectionError" in text):
        return ConfigError(f"{where}.task: lm-eval task {name!r} needs its dataset from the Hugging Face Hub, "
                           f"which cannot be reached here ({text}); {OFFLINE_HINT}")
    return ConfigError(f"{where}.task: lm-eval rejects task {name!r} ({source}): {text}")


def _build(manager, entry, settings):
    """The task or group `entry` with the settings' TaskConfig overrides (lm-eval's factory
    merges them into the YAML's config, as its group files do for their tasks)."""
    overrides = dict(settings.overrides)
    if settings.gen_kwargs:
        base = overrides.get("generation_kwargs") or (entry.cfg.get("generation_kwargs") if entry.cfg else None)
        base = dict(base or {})
        overrides["generation_kwargs"] = {**base, **settings.gen_kwargs}
    if not overrides:
        return manager.load([settings.task])
    return manager.load([manager._factory.build(entry, overrides=overrides, registry=manager.task_index)])


def resolve(settings, *, root: Path | str = ".", where: str = "settings") -> Resolved:
    """Load and check the lm-eval task `settings.task` (settings: task.Settings)."""
    include_path = settings.include_path
    if include_path is not None:
        include_path = str((Path(root) / Path(include_path).expanduser()).resolve())
        if not Path(include_path).is_dir():
            raise ConfigError(f"{where}.include_path: expected a folder of lm-eval task YAMLs, "
                              f"but {include_path} is not a directory")
    return _resolve(settings, include_path, where)


def _resolve(settings, include_path: str | None, where: str) -> Resolved:
    manager = task_manager(include_path, settings.task)
    name = settings.task
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        rejected = _rejected_yamls(include_path) if include_path else []
        hint = f"; closest lm-eval names: {', '.join(close)}" if close else ""
        if rejected:
            hint += f"; lm-eval rejects {'; '.join(rejected[:3])}"
        raise ConfigError(f"{where}.task: unknown lm-eval task {name!r}{hint}")
    entry = manager.task_index[name]
    source = str(entry.yaml_path) if entry.yaml_path else "lm-eval's registry"
    try:
        loaded = _build(manager, entry, settings)
    except Exception as exc:  # lm-eval, datasets and fsspec raise many kinds
        raise _explain_load_error(exc, name, where, source) from None
    tasks = dict(sorted(loaded["tasks"].items()))
    if not tasks:
        raise ConfigError(f"{where}.task: lm-eval task {name!r} has no sub-tasks")
    for task_name, task in tasks.items():
        if getattr(task, "UNSAFE_CODE", False):
            raise ConfigError(f"{where}.task: lm-eval task {task_name!r} runs the model's code in this process "
                              "(unsafe_code), outside cqd_mpi's sandbox; score code skills with kind: mbpp, "
                              "which runs them sandboxed")
        if task.get_config("output_type") == "generate_until":
            from cqd_mpi.tasks.lmeval.adapter import sampling_requested

            gen = task.get_config("generation_kwargs") or {}
            if sampling_requested(gen):
                raise ConfigError(f"{where}.gen_kwargs: lm-eval task {task_name!r} samples ({json.dumps(gen)}); "
                                  "CycleQD scores greedy generations only: give do_sample: false, temperature: 0")
        if not len(task.eval_docs):
            raise ConfigError(f"{where}.task: lm-eval task {task_name!r} has no documents in its evaluation split")
    first = next(iter(tasks.values()))
    metric = _pick_metric(settings.metric, tasks, where)
    filters = [f.name for f in first._filters]
    chosen = settings.filter or filters[0]
    for task_name, task in tasks.items():
        names = [f.name for f in task._filters]
        if chosen not in names:
            raise ConfigError(f"{where}.filter: lm-eval task {task_name!r} has filters {names}, not {chosen!r}")
    output_types = frozenset(str(task.get_config("output_type")) for task in tasks.values())
    return Resolved(name=name, tasks=tasks, groups=dict(loaded.get("groups") or {}), metric=metric,
                    filter=chosen, output_types=output_types)


def _pick_metric(wanted: str | None, tasks: dict[str, Any], where: str) -> str:
    """`wanted`, or the first metric where higher is better; refused unless every sub-task
    averages it over documents (lm-eval's `mean`) with higher better."""
    first_name, first = next(iter(tasks.items()))
    higher = first.higher_is_better()
    if wanted is None:
        candidates = [m for m in first.aggregation() if higher.get(m)]
        if not candidates:
            raise ConfigError(f"{where}.metric: lm-eval task {first_name!r} has no metric where higher is better "
                              f"(it has {list(first.aggregation())})")
        wanted = candidates[0]
    for task_name, task in tasks.items():
        aggregation = task.aggregation()
        if wanted not in aggregation:
            raise ConfigError(f"{where}.metric: lm-eval task {task_name!r} has metrics {list(aggregation)}, "
                              f"not {wanted!r}")
        how = getattr(aggregation[wanted], "__name__", str(aggregation[wanted]))
        if how != "mean":
            raise ConfigError(f"{where}.metric: {wanted!r} of lm-eval task {task_name!r} is aggregated over the "
                              f"corpus ({how}), not a mean of per-document scores in [0, 1]; choose another metric")
        if not task.higher_is_better().get(wanted, False):
            raise ConfigError(f"{where}.metric: {wanted!r} of lm-eval task {task_name!r} is better when lower; "
                              "CycleQD maximises its task scores")
    return wanted
