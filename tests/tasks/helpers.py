"""Shared helpers of the MBPP+ harness's tests (MBPP+ and HumanEval+ data): a task built as a
config builds it, the canonical solution, and a model that answers from a script."""

from __future__ import annotations

from pathlib import Path

from cqd_mpi import schema
from cqd_mpi.tasks import protocols
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.mbpp import MbppPlusTask, Settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MBPP_FIXTURE = FIXTURES / "mbpp" / "MbppPlus-fixture.jsonl"
HUMANEVAL_FIXTURE = FIXTURES / "humaneval" / "HumanEvalPlus-fixture.jsonl"


def make_task(data=MBPP_FIXTURE, *, context=None, protocol=None, **settings):
    """An MBPP+ task over `data`: the Settings defaults (the `paper` preset's), or a preset
    resolved as a config resolves it, with `settings` on top."""
    if protocol is not None:
        _, settings = protocols.resolve(MbppPlusTask, name=protocol, default=protocols.DEFAULT,
                                        settings=settings, where="tasks[0]")
    return MbppPlusTask(name="mbpp", data=None if data is None else str(data),
                        settings=schema.build(Settings, settings, "tasks[0].settings"),
                        context=context or TaskContext())


def canonical(task, item_id):
    problem = task.problems[item_id]
    return problem["prompt"] + problem["canonical_solution"]


class ScriptedModel:
    """A stand-in model that answers each problem with a fixed reply, found by its entry point."""

    def __init__(self, replies):
        self.replies = replies
        self.calls = []

    def _answer(self, text, stop):
        for entry_point, reply in self.replies.items():
            if entry_point in text:
                cut = min([reply.find(s) for s in stop if s in reply] or [len(reply)])
                return reply[:cut]
        return "I do not know."

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.calls.append(("generate", list(prompts), list(stop)))
        return [self._answer(p, stop) for p in prompts]

    def chat(self, conversations, *, max_new_tokens, stop=()):
        self.calls.append(("chat", [list(c) for c in conversations], list(stop)))
        return [self._answer(c[-2]["content"], stop) for c in conversations]
