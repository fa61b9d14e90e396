"""`kind: lm-eval`: an item is one document of an lm-eval task (or of a group's sub-tasks).

An item's id is ``<lm-eval task>/<doc id>``; its score is lm-eval's own per-sample metric for
that document after the task's filters, computed by lm-eval's evaluator on the worker's live
engine (adapter.EngineLM), so a task's mean over items equals lm-eval's aggregate for its
mean-aggregated metrics. A group's items are its sub-tasks' documents; its score is the mean
over documents (`group_weighting: documents`) or over sub-tasks (`tasks`, lm-eval's
`weight_by_size: false`). docs/lm-eval.md has the details.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cqd_mpi import schema
from cqd_mpi.engines.base import Capability, LogLikelihoods, TextGeneration
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks.base import ItemResult, Task
from cqd_mpi.tasks.lmeval.fewshot import FewshotDraws


@dataclasses.dataclass
class Settings:
    """`settings:` of an lm-eval task: lm-eval's own names and meanings (docs/lm-eval.md).

    Any other key must be a field of lm-eval's TaskConfig (doc_to_text, dataset_kwargs, ...);
    those are collected in `overrides` and passed to lm-eval as overrides of the task's YAML.
    """

    task: str
    include_path: str | None = None
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None
    metric: str | None = None
    filter: str | None = None
    group_weighting: Literal["documents", "tasks"] = "documents"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=schema.REST)

    def validate(self, where: str) -> None:
        if not self.task:
            raise ConfigError(f"{where}.task: expected an lm-eval task or group name, got {self.task!r}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"{where}.num_fewshot: expected an integer >= 0, got {self.num_fewshot}")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ConfigError(f"{where}.fewshot_as_multiturn: needs apply_chat_template: true (as in lm-eval)")
        if self.overrides:
            _check_task_config_keys(self.overrides, where)


def _check_task_config_keys(keys, where: str) -> None:
    """Refuse a key that is neither ours nor a field of lm-eval's TaskConfig, naming the closest."""
    from cqd_mpi.tasks.lmeval import require

    require()
    from lm_eval.api.task import TaskConfig

    ours = [f.name for f in dataclasses.fields(Settings) if f.name != "overrides"]
    theirs = [f.name for f in dataclasses.fields(TaskConfig) if f.name not in ours]
    for key in sorted(keys):
        if key == "task_config":
            raise ConfigError(f"{where}.task_config: give lm-eval's TaskConfig keys directly under settings "
                              "(e.g. doc_to_text: ...), not in a nested mapping")
        if key not in theirs:
            close = difflib.get_close_matches(str(key), ours + theirs, n=3, cutoff=0.6)
            hint = (f"closest valid keys: {', '.join(close)}" if close else
                    f"expected one of {', '.join(ours)} or a field of lm-eval's TaskConfig (docs/lm-eval.md)")
            raise ConfigError(f"{where}: unknown key {key!r}, neither a setting of kind 'lm-eval' nor a field of "
                              f"lm-eval's TaskConfig; {hint}")


def _quiet() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


class LmEvalTask(Task):
    """The documents of one lm-eval task (or group) scored by lm-eval's evaluator."""

    kind = "lm-eval"
    Settings = Settings
    path_settings = ("include_path",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from cqd_mpi.tasks.lmeval.resolve import resolve

        _quiet()
        self.resolved = resolve(self.settings, root=self.context.config_dir, where=f"task {self.name!r} settings")
        self._fewshot = {name: FewshotDraws(task, num_fewshot=self.settings.num_fewshot, seed=self.settings.fewshot_seed)
                         for name, task in self.resolved.tasks.items()}
        self._ids = [f"{task}/{doc_id}" for task, doc_id in self.resolved.doc_ids()]
        self._known = set(self._ids)

    @classmethod
    def capabilities_needed(cls, settings: Settings, *, root: Path | str = ".", where: str = "settings"
                            ) -> tuple[type[Capability], ...]:
        """Text generation, and log-likelihoods unless every sub-task only generates."""
        from cqd_mpi.tasks.lmeval.resolve import resolve

        _quiet()
        resolved = resolve(settings, root=root, where=where)
        return (TextGeneration,) if resolved.output_types <= {"generate_until"} else (TextGeneration, LogLikelihoods)

    def item_ids(self) -> list[str]:
        return list(self._ids)

    def evaluate(self, model: Any, item_ids: Sequence[str]) -> list[ItemResult]:
        unknown = [i for i in item_ids if i not in self._known]
        if unknown:
            raise TaskError(f"task {self.name!r}: unknown item ids {unknown[:3]}")
        return self._evaluate(model, item_ids)  # run/evaluation.isolated_results isolates items

    def _evaluate(self, model: Any, item_ids: Sequence[str]) -> list[ItemResult]:
        from lm_eval.evaluator import evaluate

        from cqd_mpi.tasks.lmeval.adapter import EngineLM

        started = time.perf_counter()
        wanted: dict[str, list[int]] = defaultdict(list)
        for item_id in item_ids:
            task, _, doc_id = item_id.rpartition("/")
            wanted[task].append(int(doc_id))
        tasks = {name: self.resolved.tasks[name] for name in wanted}
        samples = {name: sorted(ids) for name, ids in wanted.items()}
        with contextlib.ExitStack() as stack:
            for name, ids in samples.items():
                stack.enter_context(self._fewshot[name].building(ids))
            output = evaluate(
                lm=EngineLM(model, name=self.name), task_dict={"tasks": tasks, "groups": {}, "group_map": {}},
                samples=samples, log_samples=True, bootstrap_iters=0,
                system_instruction=self.settings.system_instruction,
                apply_chat_template=self.settings.apply_chat_template,
                fewshot_as_multiturn=self.settings.fewshot_as_multiturn)
        scores: dict[str, tuple[float, dict]] = {}
        for name, samples in output["samples"].items():
            for sample in samples:
                if sample["filter"] == self.resolved.filter:
                    scores[f"{name}/{sample['doc_id']}"] = (sample[self.resolved.metric], sample)
        seconds = (time.perf_counter() - started) / max(len(item_ids), 1)
        results = []
        for item_id in item_ids:
            if item_id not in scores:
                results.append(ItemResult(item_id, 0.0, error="lm-eval: no per-sample result", seconds=seconds))
                continue
            value, sample = scores[item_id]
            detail = {"filtered": _plain(sample["filtered_resps"]), "target": _plain(sample["target"]),
                      "prompt_hash": sample["prompt_hash"]}
            score = float(value)
            if not 0.0 <= score <= 1.0:
                results.append(ItemResult(item_id, 0.0, error=f"lm-eval: {self.resolved.metric} = {score} is "
                                          "outside [0, 1]", seconds=seconds, detail=detail))
            else:
                results.append(ItemResult(item_id, score, seconds=seconds, detail=detail))
        return results

    def data_digest(self) -> str:
        """sha256 over every sub-task's resolved TaskConfig (its YAML with the overrides) and its
        documents: those scored and, with few-shot examples, those they are drawn from."""
        import hashlib

        digest = hashlib.sha256()
        for name, task in self.resolved.tasks.items():
            digest.update(_stable_json([name, task.dump_config()]).encode())
            docs = [task.eval_docs]
            if self._fewshot[name].num_fewshot and task.fewshot_docs() is not None:
                docs.append(task.fewshot_docs())
            for doc in (doc for part in docs for doc in part):
                digest.update(_stable_json(doc).encode() + b"\n")
        return "sha256:" + digest.hexdigest()

    def metric(self, results: Sequence[ItemResult]) -> float:
        """The mean over documents, or with `group_weighting: tasks` the mean of sub-task means."""
        if self.settings.group_weighting == "documents" or len(self.resolved.tasks) == 1:
            return super().metric(results)
        by_task: dict[str, list[float]] = defaultdict(list)
        for result in results:
            by_task[result.item_id.rpartition("/")[0]].append(result.score)
        return float(sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)) if by_task else 0.0


def _plain(value: Any) -> Any:
    """JSON-safe detail (lm-eval's responses hold tuples and numpy scalars)."""
    return json.loads(json.dumps(value, default=str))


def _stable_json(value: Any) -> str:
    """Canonical JSON of a config or document, the same in every process (objects without a
    JSON form by their text, less the memory address some texts hold)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(value, sort_keys=True, default=str))
