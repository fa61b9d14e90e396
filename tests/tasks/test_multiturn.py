"""The shared agent loop: rounds, batching, and errors that stay with their item.

The environment here is a counter in memory (the loop knows nothing about what an
environment is); tests/tasks/test_dbbench.py and test_os_interaction.py run the same loop
against a real database server and real Linux environments.
"""

import threading

import pytest

from cqd_mpi.errors import BackendUnavailable, TaskError
from cqd_mpi.tasks.base import ItemResult
from cqd_mpi.tasks.multiturn import Episode, play


class Counting(Episode):
    """Replies 'add N' add N to the item's counter; 'stop' ends the item, scored 1 when the counter is 3.
    `fail` names the stage at which this item raises."""

    def __init__(self, item_id, fail=None, log=None):
        super().__init__(item_id=item_id, history=[{"role": "user", "content": f"item {item_id}"}])
        self.counter = None
        self.fail = fail
        self.log = log if log is not None else []

    def set_up(self):
        if self.fail == "setup":
            raise OSError("no room for this item")
        if self.fail == "down":
            raise BackendUnavailable("the server is down")
        self.counter = 0

    def take_reply(self, reply):
        self.history.append({"role": "assistant", "content": reply})
        if self.fail == "reply":
            raise ValueError("cannot parse")
        if reply.startswith("add "):
            return int(reply[4:])
        self.status = "stopped"
        return None

    def act(self, amount):
        if self.fail == "action":
            raise RuntimeError("the environment broke")
        self.counter += amount
        return f"counter {self.counter}"

    def score(self):
        if self.fail == "scoring":
            raise KeyError("the check is gone")
        return ItemResult(item_id=self.item_id, score=float(self.counter == 3), detail={"counter": self.counter})

    def tear_down(self):
        self.log.append(self.item_id)


def policy(plan):
    """Replies by item id: a list of replies, one per round."""
    calls = []

    def respond(episodes):
        calls.append([e.item_id for e in episodes])
        return [plan[e.item_id][sum(m["role"] == "assistant" for m in e.history)] for e in episodes]

    return respond, calls


def test_rounds_are_batched_and_observations_come_back_as_user_turns():
    episodes = [Counting("a"), Counting("b"), Counting("c")]
    respond, calls = policy({"a": ["add 3", "stop"], "b": ["add 1", "add 1", "stop"], "c": ["stop"]})
    results = play(episodes, respond, parallel=2, where="test")
    assert calls == [["a", "b", "c"], ["a", "b"], ["b"]]
    assert [(r.item_id, r.score, r.error) for r in results] == [("a", 1.0, None), ("b", 0.0, None), ("c", 0.0, None)]
    assert episodes[0].history[2] == {"role": "user", "content": "counter 3"}
    assert all(r.seconds > 0 for r in results)


@pytest.mark.parametrize("stage", ["setup", "reply", "action", "scoring"])
def test_an_exception_in_one_item_scores_it_zero_with_the_stage_as_its_error(stage, caplog):
    log = []
    episodes = [Counting("ok", log=log), Counting("bad", fail=stage, log=log), Counting("ok2", log=log)]
    respond, _ = policy({"ok": ["add 3", "stop"], "bad": ["add 3", "stop"], "ok2": ["add 3", "stop"]})
    with caplog.at_level("ERROR", logger="cqd_mpi.tasks.multiturn"):
        results = play(episodes, respond, parallel=3, where="task 'counting'")
    assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, stage), (1.0, None)]
    assert results[1].detail["status"] == f"{stage}-error"
    assert results[1].detail["message"].split(":")[0] in {"OSError", "ValueError", "RuntimeError", "KeyError"}
    [record] = [r for r in caplog.records if "item bad failed" in r.getMessage()]
    assert record.exc_info is not None and "task 'counting'" in record.getMessage()
    assert sorted(log) == ["bad", "ok", "ok2"]


def test_a_backend_that_is_down_ends_the_batch_after_every_tear_down():
    log = []
    episodes = [Counting("a", log=log), Counting("b", fail="down", log=log)]
    respond, calls = policy({"a": ["stop"], "b": ["stop"]})
    with pytest.raises(BackendUnavailable, match="the server is down"):
        play(episodes, respond, parallel=2, where="test")
    assert calls == [] and sorted(log) == ["a", "b"]


def test_a_model_with_the_wrong_number_of_replies_is_an_error_and_everything_is_torn_down():
    log = []
    with pytest.raises(TaskError, match="returned 1 replies for 2 conversations"):
        play([Counting("a", log=log), Counting("b", log=log)], lambda episodes: ["stop"], parallel=2, where="test")
    assert sorted(log) == ["a", "b"]


def test_environment_steps_run_in_parallel():
    barrier = threading.Barrier(3, timeout=10)

    class Meeting(Counting):
        def act(self, amount):
            barrier.wait()
            return super().act(amount)

    respond, _ = policy({i: ["add 3", "stop"] for i in "xyz"})
    results = play([Meeting(i) for i in "xyz"], respond, parallel=3, where="test")
    assert [r.score for r in results] == [1.0, 1.0, 1.0]


def test_a_conversation_past_the_models_context_ends_its_item_alone():
    """The engine's ContextOverflow reply ends that episode unjudged, with error context-limit
    (AgentBench v0.2 src/server/tasks/os_interaction/task.py:478-481, AGENT_CONTEXT_LIMIT)."""
    from cqd_mpi.engines.base import ContextOverflow

    episodes = [Counting("a"), Counting("b")]
    overflow = ContextOverflow(prompt_tokens=900, context_length=512)
    respond, calls = policy({"a": ["add 3", "stop"], "b": ["add 1", overflow]})
    results = play(episodes, respond, parallel=2, where="test")
    assert calls == [["a", "b"], ["a", "b"]]
    assert [(r.item_id, r.score, r.error) for r in results] == [("a", 1.0, None), ("b", 0.0, "context-limit")]
    assert results[1].detail == {"status": "context-limit", "message": "the prompt has 900 tokens, which leaves no "
                                 "room for a reply within the model's context of 512"}
    assert episodes[1].log == ["b"]
