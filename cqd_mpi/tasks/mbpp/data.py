"""MbppPlus and HumanEvalPlus data: where evalplus keeps a release, and its jsonl read and
checked as evalplus's own loaders do (MbppPlus inputs through its deserializer; HumanEvalPlus
inputs are plain JSON); nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cqd_mpi.errors import TaskError, require

DATASETS = {"mbpp": ("MbppPlus", "MBPP+", "Mbpp/", "MBPP_OVERRIDE_PATH"),
            "humaneval": ("HumanEvalPlus", "HumanEval+", "HumanEval/", "HUMANEVAL_OVERRIDE_PATH")}
"""Per dataset: evalplus's release name, its name in messages, its task_id prefix, and the
environment variable evalplus reads for a local file (evalplus/data/mbpp.py, humaneval.py)."""


def default_data_path(version: str = "default", dataset: str = "mbpp") -> tuple[Path, str]:
    """Where evalplus keeps release `version` of `dataset` (its override variable wins), and its URL."""
    release_name, _, _, variable = DATASETS[dataset]
    override = os.environ.get(variable)
    require("evalplus.data", extra="llm", feature="The MBPP+ task")
    from evalplus.data.humaneval import HUMANEVAL_PLUS_VERSION
    from evalplus.data.mbpp import MBPP_PLUS_VERSION
    from evalplus.data.utils import get_dataset_metadata

    latest = MBPP_PLUS_VERSION if dataset == "mbpp" else HUMANEVAL_PLUS_VERSION
    release = latest if version == "default" else version
    url, cache_path = get_dataset_metadata(release_name, release, False)
    return (Path(override) if override else Path(cache_path)), url


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a jsonl or jsonl.gz file, blank lines skipped as evalplus's stream_jsonl does;
    an unreadable row is a TaskError naming the file and its line."""
    import gzip

    rows = []
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else
              open(path, encoding="utf-8")) as handle:
            for number, line in enumerate(handle, start=1):
                if line.isspace():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    where = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
                    raise TaskError(f"MBPP+ data {path} line {number}: not valid JSON ({where})") from exc
                if not isinstance(row, dict) or not isinstance(row.get("task_id"), str):
                    raise TaskError(f"MBPP+ data {path} line {number}: expected a JSON object with a string "
                                    f"'task_id', got {str(row)[:60]!r}")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TaskError(f"MBPP+ data {path}: cannot read it as MbppPlus jsonl ({type(exc).__name__}: {exc})") from exc
    return rows


def load_problems(path: Path, dataset: str = "mbpp") -> dict[str, dict[str, Any]]:
    """The problems of `dataset` in `path` (jsonl or jsonl.gz), inputs deserialized as evalplus does.
    A file of the other dataset (its task_id prefix) is refused with the setting to change."""
    require("evalplus.data", extra="llm", feature="The MBPP+ task")
    from evalplus.data.mbpp import mbpp_deserialize_inputs
    from evalplus.data.utils import completeness_check

    _, label, _, _ = DATASETS[dataset]
    problems = {row["task_id"]: row for row in read_jsonl(path)}
    if not problems:
        raise TaskError(f"{label} data {path}: the file holds no problems")
    first = next(iter(problems))
    for other, (_, other_label, prefix, _) in DATASETS.items():
        if other != dataset and first.startswith(prefix):
            raise TaskError(f"{label} data {path}: expected {label} problems (settings.dataset {dataset!r}), "
                            f"got {other_label} ones ({first!r}); set `dataset: {other}` in the task's settings")
    for task_id, problem in problems.items():
        for key in ("entry_point", "prompt", "base_input"):
            if key not in problem:
                raise TaskError(f"{label} data {path}: problem {task_id!r} has no {key!r} field")
        if not str(problem["entry_point"]).isidentifier():
            raise TaskError(f"{label} data {path}: problem {task_id!r} has entry_point "
                            f"{problem['entry_point']!r}, expected a Python identifier")
        if dataset != "mbpp":
            continue
        try:
            problem["base_input"] = mbpp_deserialize_inputs(task_id, problem["base_input"])
            problem["plus_input"] = mbpp_deserialize_inputs(task_id, problem.get("plus_input", []))
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise TaskError(f"MBPP+ data {path}: problem {task_id!r} has inputs evalplus cannot deserialize: {exc}") from exc
    try:
        completeness_check(label, problems)
    except AssertionError as exc:
        raise TaskError(f"{label} data {path}: {exc}") from exc
    return problems
