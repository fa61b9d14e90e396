"""The MBPP+ task (`kind: mbpp`): its problems, prompts, solutions, and their runs and verdicts;
see the package docstring for the protocols."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cqd_mpi.engines.base import ContextOverflow, TextGeneration
from cqd_mpi.errors import TaskError, require
from cqd_mpi.tasks import protocols
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task
from cqd_mpi.tasks.mbpp import authors as mbpp_authors
from cqd_mpi.tasks.mbpp.data import DATASETS, default_data_path, load_problems
from cqd_mpi.tasks.mbpp.harness import (
    CHECK_SLACK_SECONDS,
    HARNESS,
    JUDGE_ERRORS,
    JUDGE_ITEM_SECONDS,
    VERDICTS,
    Groundtruth,
    RunRecord,
    _read_run,
)
from cqd_mpi.tasks.mbpp.settings import (
    Settings,
)

CHAT_STOP = ("\n```\n",)
"""evalplus's extra stop string for a model with a chat template, added to its EOS list."""

TEXT_EXCERPT_CHARS = 4000


class MbppPlusTask(Task):
    """MBPP+ greedy pass@1, scored as the task's protocol says (see the module docstring)."""

    kind = "mbpp"
    Settings = Settings
    presets = protocols.MBPP

    def __init__(self, *, name, data, settings, context):
        super().__init__(name=name, data=data, settings=settings or Settings(), context=context)
        self._problems: dict[str, dict[str, Any]] | None = None
        self._groundtruth: dict[str, Groundtruth] = {}
        self._lock = threading.Lock()
        self._sandbox = None

    # ------------------------------------------------------------------ data

    def data_path(self) -> Path:
        if self.data:
            path = Path(self.data).expanduser()
            return path if path.is_absolute() else Path(self.context.config_dir) / path
        return default_data_path(*self._release())[0]

    def data_digest(self) -> str:
        """The digest of the problems file scored (the user's `data`, else evalplus's release)."""
        from cqd_mpi.tasks.base import path_digest

        return path_digest(self.data_path())

    def _release(self) -> tuple[str, str]:
        """The evalplus release settings name, and its dataset."""
        settings = self.settings
        version = settings.version if settings.dataset == "mbpp" else settings.humaneval_version
        return version, settings.dataset

    @property
    def problems(self) -> dict[str, dict[str, Any]]:
        if self._problems is None:
            path = self.data_path()
            if not path.is_file():
                raise TaskError(self._missing_data_message(path))
            problems = load_problems(path, self.settings.dataset)
            wanted = self.settings.task_ids
            if wanted is not None:
                unknown = [t for t in wanted if t not in problems]
                if unknown:
                    raise TaskError(
                        f"task {self.name!r}: settings.task_ids names {', '.join(map(repr, unknown))}, "
                        f"which {path} does not hold (it has {', '.join(list(problems)[:3])}, ...)"
                    )
                problems = {t: p for t, p in problems.items() if t in set(wanted)}
            else:
                self._check_release(path, len(problems))
            self._problems = problems
        return self._problems

    def _check_release(self, path: Path, count: int) -> None:
        """Warn when the file's problem count is not that of the release settings.version names."""
        version, dataset = self._release()
        expected = protocols.EVALPLUS_PROBLEMS[dataset].get(version)
        if expected is not None and count != expected:
            key = "version" if dataset == "mbpp" else "humaneval_version"
            self.context.log.warning(
                "task %s: %s holds %d problems, but %s %s (settings.%s) has %d; scores will not "
                "compare with that release's", self.name, path, count, DATASETS[dataset][0], version, key, expected)

    def _missing_data_message(self, path: Path) -> str:
        version, dataset = self._release()
        release, label, _, variable = DATASETS[dataset]
        getter = "get_mbpp_plus" if dataset == "mbpp" else "get_human_eval_plus"
        how = (
            f"give `data: /path/to/{release}.jsonl` for task {self.name!r} in the config, set "
            f"{variable}, or fetch evalplus's release once on a machine with internet: "
            f"python -c 'from evalplus.data import {getter}; {getter}(version=\"{version}\")'"
        )
        if not self.data and not os.environ.get(variable):
            url = default_data_path(version, dataset)[1]
            how += f" (it downloads {url} into {path.parent})"
        return f"{label} data file {path} does not exist; nothing is downloaded at run time. To get it, {how}"

    def item_seconds(self, item_id: str) -> float:
        """Two runs of the solution (one retry) and two of the judge, each at its wall limit."""
        settings = self.settings
        judge = settings.startup_seconds + len(self.inputs(item_id)) * settings.judge_seconds + JUDGE_ITEM_SECONDS
        return 2 * (self.run_wall(item_id) + judge)

    def item_ids(self) -> list[str]:
        return list(self.problems)

    def _problem(self, item_id: str) -> dict[str, Any]:
        try:
            return self.problems[item_id]
        except KeyError:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}") from None

    def inputs(self, item_id: str) -> list:
        """The test inputs of one problem: its base inputs, then its plus inputs for tests 'base+plus'."""
        problem = self._problem(item_id)
        if self.settings.tests == "base":
            return problem["base_input"]
        return [*problem["base_input"], *problem["plus_input"]]

    def groundtruth(self, item_id: str) -> Groundtruth:
        """Expected outputs and reference times on `inputs`, from canonical_solution (evalplus's trusted_exec)."""
        with self._lock:
            if item_id in self._groundtruth:
                return self._groundtruth[item_id]
        from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
        from evalplus.gen.util import trusted_exec

        problem = self._problem(item_id)
        if "canonical_solution" not in problem:
            raise TaskError(f"{DATASETS[self.settings.dataset][1]} data {self.data_path()}: problem {item_id!r} has no canonical_solution")
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                outputs, seconds = trusted_exec(
                    problem["prompt"] + problem["canonical_solution"],
                    self.inputs(item_id),
                    problem["entry_point"],
                    record_time=True,
                    output_not_none=(self.settings.dataset == "mbpp"
                                     and problem["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS),
                )
        except Exception as exc:
            raise TaskError(
                f"{DATASETS[self.settings.dataset][1]} data {self.data_path()}: the canonical_solution of {item_id!r} fails on its "
                f"{self.settings.tests} inputs ({type(exc).__name__}: {exc})"
            ) from exc
        truth = Groundtruth(outputs=list(outputs), seconds=[float(s) for s in seconds])
        with self._lock:
            self._groundtruth[item_id] = truth
        return truth

    # ------------------------------------------------------------- prompting

    def instruction(self, item_id: str) -> str:
        """The user turn: the authors' assertion instruction or evalplus's fenced prompt."""
        prompt = self._problem(item_id)["prompt"]
        if self.settings.instruction == "assertion":
            try:
                return mbpp_authors.instruction(prompt)
            except mbpp_authors.PromptShapeError as exc:
                raise TaskError(f"task {self.name!r}: the prompt of {item_id!r} cannot be cut into the authors' "
                                f"instruction (settings.instruction 'assertion'): {exc}") from None
        return f"{self.settings.instruction_prefix}\n```\n{prompt.strip()}\n```\n"

    def conversation(self, item_id: str) -> list[dict[str, str]]:
        """The chat turns for one problem: the system message, the instruction, the response prefix to continue."""
        settings = self.settings
        messages = []
        if settings.system_message:
            messages.append({"role": "system", "content": settings.system_message})
        messages.append({"role": "user", "content": self.instruction(item_id)})
        if settings.response_prefix:
            messages.append({"role": "assistant", "content": settings.response_prefix})
        return messages

    def prompt_text(self, item_id: str) -> str:
        """The text sent to `generate` for the formats that do not use the engine's chat template."""
        settings = self.settings
        if settings.prompt_format == "completion":
            return self._problem(item_id)["prompt"].strip() + "\n"
        return mbpp_authors.prompt_text(system_message=settings.system_message, user=self.instruction(item_id),
                                        response_prefix=settings.response_prefix)

    def stop_strings(self) -> list[str]:
        """settings.stop, or evalplus's for the prompt format (its EOS list and the chat or completion extras)."""
        if self.settings.stop is not None:
            return list(self.settings.stop)
        from evalplus.provider.utility import EOS, extra_eos_for_direct_completion

        if self.settings.prompt_format == "completion":
            return [*EOS, *extra_eos_for_direct_completion(self.settings.dataset)]
        return [*EOS, *CHAT_STOP]

    def completions(self, model: TextGeneration, item_ids: Sequence[str]) -> list[str]:
        """The model's raw completions, one per item (greedy, batched by the engine)."""
        settings = self.settings
        stop = self.stop_strings()
        if settings.prompt_format == "chat":
            conversations = [self.conversation(i) for i in item_ids]
            return list(model.chat(conversations, max_new_tokens=settings.max_new_tokens, stop=stop))
        prompts = [self.prompt_text(i) for i in item_ids]
        return list(model.generate(prompts, max_new_tokens=settings.max_new_tokens, stop=stop))

    def solution(self, item_id: str, completion: str) -> str:
        """The code to test: the authors' text sanitizer, or evalplus's codegen (tabs as four
        spaces, the prompt first for completion prompts) and sanitize."""
        problem = self._problem(item_id)
        if self.settings.sanitizer == "authors":
            return mbpp_authors.solution(prompt=problem["prompt"], completion=completion,
                                         entry_point=problem["entry_point"])
        from evalplus.sanitize import sanitize

        completion = completion.replace("\t", "    ")
        if self.settings.prompt_format == "completion":
            completion = self.prompt_text(item_id) + completion
        return sanitize(completion, entrypoint=problem["entry_point"])

    # ------------------------------------------------------------- execution

    @property
    def sandbox(self):
        if self._sandbox is None:
            from cqd_mpi.sandboxes.python_exec import PythonSandbox, SandboxLimits

            self._sandbox = PythonSandbox(kind=self.settings.sandbox, limits=SandboxLimits())
        return self._sandbox

    def _limits(self, wall_seconds: float):
        from cqd_mpi.sandboxes.python_exec import SandboxLimits

        settings = self.settings
        return SandboxLimits(
            wall_seconds=wall_seconds,
            cpu_seconds=math.ceil(wall_seconds) + 1,
            memory_bytes=settings.memory_mb << 20,
            processes=settings.max_processes,
        )

    def time_limits(self, item_id: str) -> list[float]:
        """evalplus's per-input limits: max(min_time_limit, factor x reference time)."""
        settings = self.settings
        return [max(settings.min_time_limit, settings.gt_time_limit_factor * t)
                for t in self.groundtruth(item_id).seconds]

    def run_wall(self, item_id: str) -> float:
        """The wall-clock bound of one run of a solution: start-up, then per check (the base inputs,
        and the plus inputs for tests 'base+plus') the sum of its per-input limits, capped at
        `timeout_seconds` (evalplus 0.3.1's 60 s; null: no cap, as the pinned commit), plus
        evalplus's slack (CHECK_SLACK_SECONDS)."""
        settings, limits = self.settings, self.time_limits(item_id)
        base = len(self._problem(item_id)["base_input"])
        checks = [sum(limits[:base])] + ([sum(limits[base:])] if len(limits) > base else [])
        cap = settings.timeout_seconds
        return settings.startup_seconds + sum((c if cap is None else min(cap, c)) + CHECK_SLACK_SECONDS
                                              for c in checks)

    def run_solution(self, item_id: str, code: str) -> RunRecord:
        """Execute one solution on the item's base inputs in a fresh sandbox; never raises for the code."""
        problem = self._problem(item_id)
        limits = self.time_limits(item_id)
        wall = self.run_wall(item_id)
        inputs = self.inputs(item_id)
        request = {"mode": "run", "code": code, "entry_point": problem["entry_point"],
                   "inputs": inputs, "time_limits": limits}
        payload = pickle.dumps(request)
        for _attempt in range(2):
            result = self.sandbox.run(HARNESS, stdin=payload, limits=self._limits(wall))
            if result.started:
                break
        return _read_run(result, expected_count=len(inputs))

    def judge(self, item_ids: Sequence[str], records: Sequence[RunRecord]) -> list[str | None]:
        """evalplus's verdict ('pass', 'fail', 'timeout') for each complete record.

        The judge decodes and compares each output within `judge_seconds` inside evalplus's
        per-item child process, and its wall-clock limit is the sum of every item's bound, so
        one item's costly outputs never take another item's verdict. Items left without one
        (the sandbox failed) are judged once more."""
        settings = self.settings
        items = []
        for index, (item_id, record) in enumerate(zip(item_ids, records)):
            problem = self._problem(item_id)
            items.append({
                "index": index,
                "entry_point": problem["entry_point"],
                "inputs": self.inputs(item_id),
                "expected": self.groundtruth(item_id).outputs,
                "atol": problem["atol"],
                "outputs": record.outputs,
            })
        verdicts: list[str | None] = [None] * len(items)
        pending = items
        for _attempt in range(2):
            if not pending:
                break
            request = {"mode": "judge", "dataset": settings.dataset, "items": pending, "judge_seconds": settings.judge_seconds,
                       "rules": settings.judge}
            wall = settings.startup_seconds + sum(
                len(item["inputs"]) * settings.judge_seconds + JUDGE_ITEM_SECONDS for item in pending)
            limits = dataclasses.replace(self._limits(wall), memory_bytes=max(settings.memory_mb, 1024) << 20)
            env = {"EVALPLUS_MAX_MEMORY_BYTES": str(limits.memory_bytes)}
            result = self.sandbox.run(HARNESS, stdin=pickle.dumps(request), env=env, limits=limits)
            for line in result.stdout.decode(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                    index, status = int(event["index"]), str(event["status"])
                except (ValueError, KeyError, TypeError):
                    continue
                if 0 <= index < len(verdicts) and status in VERDICTS:
                    verdicts[index] = status
            pending = [item for item in pending if verdicts[item["index"]] is None]
        return verdicts

    def score(self, item_ids: Sequence[str], codes: Sequence[str]) -> list[ItemResult]:
        """Run and judge each solution; one ItemResult per item, in order."""
        for item_id in item_ids:
            self.groundtruth(item_id)
        self.sandbox.kind  # noqa: B018 (fails loudly here if no sandbox works at all)
        with ThreadPoolExecutor(max_workers=self.settings.parallel) as pool:
            records = list(pool.map(self.run_solution, item_ids, codes))
        complete = [i for i, r in enumerate(records) if r.error is None]
        verdicts = self.judge([item_ids[i] for i in complete], [records[i] for i in complete])
        status: dict[int, str | None] = dict(zip(complete, verdicts))
        results = []
        for index, (item_id, code, record) in enumerate(zip(item_ids, codes, records)):
            error = record.error
            verdict = status.get(index)
            message = record.message
            if error is None:
                error = JUDGE_ERRORS.get(verdict, "sandbox")
                if verdict == "timeout":
                    message = f"decoding and checking its outputs took more than {self.settings.judge_seconds} s each"
            detail = {"solution": code[:TEXT_EXCERPT_CHARS]}
            if verdict is not None:
                detail["status"] = verdict
            if message:
                detail["message"] = message
            if record.stderr:
                detail["stderr"] = record.stderr
            results.append(ItemResult(item_id=item_id, score=1.0 if error is None else 0.0, error=error,
                                      seconds=record.seconds, detail=detail))
        return results

    # -------------------------------------------------------------- protocol

    def evaluate(self, model: TextGeneration, item_ids: Sequence[str]) -> list[ItemResult]:
        item_ids = list(item_ids)
        for item_id in item_ids:
            self._problem(item_id)
        raw = self.completions(model, item_ids)
        if len(raw) != len(item_ids):
            raise TaskError(f"task {self.name!r}: the model returned {len(raw)} completions for {len(item_ids)} prompts")
        fitting = [i for i, c in enumerate(raw) if not isinstance(c, ContextOverflow)]
        scored = self.score([item_ids[i] for i in fitting], [self.solution(item_ids[i], raw[i]) for i in fitting])
        results = dict(zip(fitting, scored))
        return [dataclasses.replace(results[i], detail={**results[i].detail, "completion": c[:TEXT_EXCERPT_CHARS]})
                if i in results else
                ItemResult(item_ids[i], 0.0, error="context-limit", detail={"status": "context-limit",
                                                                             "message": c.message})
                for i, c in enumerate(raw)]

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """canonical_solution of each item through the same sandbox and judge (check-tasks)."""
        item_ids = list(item_ids)
        codes = [self._problem(i)["prompt"] + self._problem(i)["canonical_solution"] for i in item_ids]
        return self.score(item_ids, codes)

    def check_backends(self) -> list[BackendStatus]:
        statuses = []
        try:
            require("evalplus.eval", extra="llm", feature="The MBPP+ task")
            statuses.append(BackendStatus("evalplus", True, "importable"))
        except Exception as exc:
            statuses.append(BackendStatus("evalplus", False, str(exc)))
            return statuses
        try:
            path = self.data_path()
            ok = path.is_file()
            statuses.append(BackendStatus("mbpp+ data", ok, str(path) if ok else self._missing_data_message(path)))
        except Exception as exc:
            statuses.append(BackendStatus("mbpp+ data", False, str(exc)))
        try:
            ok, message = self.sandbox.check()
        except Exception as exc:
            ok, message = False, str(exc)
        statuses.append(BackendStatus("python sandbox", ok, message))
        return statuses
