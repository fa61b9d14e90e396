"""One pass of one OS item (`OSEpisode`): set-up, the agent's rounds in its shell, the
judgement; and the oracle reply that `check-tasks` plays."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from cqd_mpi import faults
from cqd_mpi.sandboxes.osenv import EnvironmentLimit
from cqd_mpi.tasks import multiturn
from cqd_mpi.tasks.base import ItemResult, Task
from cqd_mpi.tasks.os_interaction.items import (
    Item,
    script_argv,
    shell_command,
)
from cqd_mpi.tasks.os_interaction.protocol import (
    extract_action,
    observation,
    opening,
    terminal_prompt,
)
from cqd_mpi.tasks.os_interaction.settings import Settings
from cqd_mpi.tasks.os_interaction.tamper import tampering

EXCERPT_CHARS = 2000

STATUS_ERRORS = {"completed": "wrong-answer", "round-limit": "round-limit", "invalid-action": "invalid-action",
                 "time-limit": "time-limit", "turn-limit": "turn-limit", "init-failed": "init", "tampered": "tampered",
                 "environment-limit": "environment-limit", "no-reference": "no-reference"}


class OSEpisode(multiturn.Episode):
    """One pass of one item: its conversation and its environment. `task` is the item's
    OSInteractionTask (its settings and `open_environment`)."""

    def __init__(self, *, item: Item, task: Task):
        super().__init__(item_id=item.item_id, history=opening(item.description))
        self.item = item
        self.task = task
        self.rounds = 0
        self.commands: list[str] = []
        self.outputs: list[str] = []
        self.answer: str | None = None
        self.message = ""
        self.env = None
        self.env_seconds = 0.0
        self.baseline: dict = {}
        self.tampered: list[str] = []
        self.checks: list[int | None] = []
        self.no_reference = False
        self._last_round = False

    @property
    def settings(self) -> Settings:
        return self.task.settings

    def set_up(self) -> None:
        started = time.monotonic()
        try:
            self.env = self.task.open_environment(self.item)
            faults.point("os-setup")
            for number, script in enumerate(self.item.init):
                result = self.env.exec(script_argv(script))
                if result.exit_code != 0 and self.settings.init_failure == "fail":
                    self.status = "init-failed"
                    self.message = (f"init script {number} exited {result.exit_code}"
                                    f"{' (time limit)' if result.timed_out else ''}: "
                                    f"{result.output.decode(errors='replace')[-500:]}")
                    return
            if self.item.start is not None:
                self.env.shell().run(self.item.start.code)
            if self.item.check:
                self.baseline = self.env.changes()
        except EnvironmentLimit as exc:
            self.status, self.message = "environment-limit", str(exc)
        finally:
            self.env_seconds += time.monotonic() - started

    def take_reply(self, reply: str) -> str | None:
        self.history.append({"role": "assistant", "content": reply})
        self.rounds += 1
        action, content = extract_action(reply)
        if action is None:
            self.status = "invalid-action"
            return None
        if action == "commit":
            self.answer = content
            self.status = "completed"
            return None
        if self.env_seconds > self.settings.environment.item_seconds:
            self.status = "time-limit"
            return None
        self.commands.append(content)
        if self.rounds >= self.settings.max_rounds:
            if not self.settings.judge_unfinished:
                self.status = "round-limit"
                return None
            self._last_round = True
        return content

    def act(self, command: str) -> str:
        started = time.monotonic()
        turn = self.settings.turn_seconds
        try:
            output = self.env.shell().run(command, seconds=turn)
        except EnvironmentLimit as exc:
            self.status, self.message = "environment-limit", str(exc)
            return ""
        finally:
            self.env_seconds += time.monotonic() - started
        self.outputs.append(output.text[:EXCERPT_CHARS])
        if output.timed_out and turn is not None and turn <= self.settings.environment.command_seconds:
            self.status = "turn-limit"  # the authors' wait: judged with an empty answer
            self.message = f"the command was still running after turn_seconds ({turn:g} s)"
            return ""
        if self.settings.observation == "cleaned":
            return observation(output.text)
        if output.cwd is None:
            return observation(output.raw)
        return observation(output.raw + terminal_prompt(output.cwd))  # the authors' terminal shows bash's prompt

    def take_observation(self, text: str) -> None:
        if self.status is not None:
            return
        super().take_observation(text)
        if self._last_round:
            self.status = "round-limit"

    # ------------------------------------------------------------- judging

    def judged(self) -> bool:
        if self.status == "completed":
            return True
        if self.status == "turn-limit":
            return True
        return self.settings.judge_unfinished and self.status in ("round-limit", "invalid-action", "time-limit")

    def score(self) -> ItemResult:
        passed = False
        if self.judged():
            if self.status != "completed":
                self.answer = ""
            try:
                passed = self.judge()
            except EnvironmentLimit as exc:
                self.status, self.message = "environment-limit", str(exc)
        return self.result(passed)

    def judge(self) -> bool:
        """AgentBench's judgement, with no process of the episode left and no tampering found
        (tamper.py) before the checks and after them (a check may run the agent's programs)."""
        item, answer = self.item, self.answer
        if item.match is not None:
            if isinstance(answer, str) and item.match.get("strip"):
                answer = answer.strip()
            if answer is None:
                return False
            if "answer" in item.match:
                return answer == item.match["answer"]
            return re.search(item.match["regex"], answer) is not None
        if not self._untouched():
            return False
        params = [str(answer)]
        for script in item.check:
            result = self.env.exec(script_argv(script if script is not None else item.example, params))
            self.checks.append(result.exit_code)
            if result.exit_code != 0:
                return False
            params.append(result.output.decode("utf-8", errors="replace"))
        return self._untouched()

    def _untouched(self) -> bool:
        """End every process of the environment, then run the tamper check (False: tampered)."""
        self.env.end_processes()
        self.tampered = tampering(self.baseline, self.env.changes(), self.env)
        if self.tampered:
            self.status = "tampered"
            return False
        return True

    def result(self, passed: bool) -> ItemResult:
        detail: dict[str, Any] = {
            "file": self.item.file, "index": self.item.index, "status": self.status, "rounds": self.rounds,
            "commands": [c[:EXCERPT_CHARS] for c in self.commands], "outputs": self.outputs,
            "answer": None if self.answer is None else self.answer[:EXCERPT_CHARS],
        }
        if self.checks:
            detail["checks"] = self.checks
        if self.tampered:
            detail["tampered"] = self.tampered[:50]
        restarts = self.env.shells_started - 1 if self.env is not None else 0
        if restarts > 0:
            detail["shell_restarts"] = restarts
        if self.message:
            detail["message"] = self.message[:EXCERPT_CHARS]
        status = "no-reference" if self.no_reference else self.status or "completed"
        error = None if passed else STATUS_ERRORS.get(status, status)
        return ItemResult(item_id=self.item.item_id, score=1.0 if passed else 0.0, error=error, detail=detail)

    def failed_result(self) -> ItemResult:
        result = super().failed_result()
        return dataclasses.replace(result, detail={"file": self.item.file, "index": self.item.index,
                                                   "rounds": self.rounds, **result.detail})

    def tear_down(self) -> None:
        if self.env is not None:
            self.env.close()


def reference_reply(episode: OSEpisode) -> str:
    """The oracle: echo the match answer (or run the example) in the shell, then answer the last
    line of its output (`Act: answer(...)` holds one line), or `finish` when there is none."""
    item = episode.item
    if episode.rounds == 0:
        if item.match is not None and "answer" in item.match:
            command = f"echo {_single_quoted(item.match['answer'])}"
        elif item.example is not None:
            command = shell_command(item.example)
        else:
            episode.no_reference = True
            return "Think: there is no reference solution.\n\nAct: finish"
        return f"Think: the reference solution.\n\nAct: bash\n\n```bash\n{command}\n```"
    lines = (episode.outputs[-1] if episode.outputs else "").strip().splitlines()
    if not lines:
        return "Think: done.\n\nAct: finish"
    return f"Think: its last line is the answer.\n\nAct: answer({lines[-1].strip()})"


def _single_quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
