"""Batched multi-turn episodes: the agent loop the DB and OS tasks share.

An item is played as an `Episode`: its conversation (the turns the model sees) and its
environment (a database, a Linux box). `play` drives a batch of episodes round by round: it
sets every environment up in parallel, asks the model for one reply per running
conversation in one batched call, runs the actions those replies hold in parallel and gives
each observation back as the next user turn; when no episode runs any more it scores them
in parallel and tears every environment down.

Errors stay with their item. An exception while one episode is set up, parses a reply,
acts or is scored ends that episode with score 0 and the stage as its error class
(`setup`, `reply`, `action`, `scoring`); its traceback goes to the log (the rank's log in a
run). A conversation grown past the model's context (the engine's `ContextOverflow` reply)
ends that episode with score 0 and error `context-limit`, as AgentBench ends a sample with
AGENT_CONTEXT_LIMIT, and is not judged. Only `BackendUnavailable` (a server or engine that every item needs is down after its
retries) ends the batch, once every environment has been torn down.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cqd_mpi.engines.base import ContextOverflow
from cqd_mpi.errors import BackendUnavailable, TaskError
from cqd_mpi.tasks.base import ItemResult

log = logging.getLogger("cqd_mpi.tasks.multiturn")

STAGES = ("setup", "reply", "action", "scoring", "context-limit")
MESSAGE_CHARS = 2000


@dataclasses.dataclass
class Failure:
    """Why an episode stopped with an exception: the stage and the exception's one-line text."""

    stage: str
    message: str


class Episode(abc.ABC):
    """One item's conversation and environment. Subclasses implement the four protocol steps;
    `play` calls set_up, act, score and tear_down from pool threads, the others in order."""

    def __init__(self, *, item_id: str, history: list[dict[str, str]]):
        self.item_id = item_id
        self.history = history
        self.status: str | None = None
        self.failure: Failure | None = None
        self.started = time.monotonic()
        self.seconds = 0.0

    @property
    def running(self) -> bool:
        return self.status is None and self.failure is None

    def set_up(self) -> None:
        """Create the item's environment (a database, a container)."""

    @abc.abstractmethod
    def take_reply(self, reply: str) -> Any | None:
        """Record the model's reply; the action to run, or None when the episode has ended
        (then `status` says how)."""

    @abc.abstractmethod
    def act(self, action: Any) -> str:
        """Run one action in the environment; the observation the model reads next."""

    def take_observation(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    @abc.abstractmethod
    def score(self) -> ItemResult:
        """The item's result once the conversation has ended (may run checks in the environment)."""

    def tear_down(self) -> None:
        """Release the environment; called once for every episode, set up or not."""

    def failed_result(self) -> ItemResult:
        """The result of an episode that stopped with an exception: score 0, the stage as its error."""
        failure = self.failure
        assert failure is not None
        status = failure.stage if failure.stage == "context-limit" else f"{failure.stage}-error"
        return ItemResult(item_id=self.item_id, score=0.0, error=failure.stage, seconds=self.seconds,
                          detail={"status": status, "message": failure.message})


Respond = Callable[[Sequence[Episode]], Sequence[str]]


def _guarded(stage: str, episode: Episode, call: Callable[[], Any], where: str) -> Any:
    """Run one episode's step; an exception other than BackendUnavailable becomes its failure."""
    try:
        return call()
    except BackendUnavailable:
        raise
    except Exception as exc:
        episode.failure = Failure(stage, f"{type(exc).__name__}: {exc}"[:MESSAGE_CHARS])
        log.error("%s: item %s failed in its %s: %s", where, episode.item_id, stage, episode.failure.message,
                  exc_info=True)
        return None


def play(episodes: Sequence[Episode], respond: Respond, *, parallel: int, where: str) -> list[ItemResult]:
    """Play the episodes to their end; one result per episode, in order (see the module docstring).

    `respond(running)` returns one reply per running episode (one batched model call per
    round); `where` names the task in log lines and errors.
    """
    if not episodes:
        return []
    results: dict[int, ItemResult] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        try:
            list(pool.map(lambda e: _guarded("setup", e, e.set_up, where), episodes))
            running = [e for e in episodes if e.running]
            while running:
                replies = list(respond(running))
                if len(replies) != len(running):
                    raise TaskError(f"{where}: the model returned {len(replies)} replies "
                                    f"for {len(running)} conversations")
                jobs = []
                for episode, reply in zip(running, replies):
                    if isinstance(reply, ContextOverflow):
                        episode.failure = Failure("context-limit", reply.message)
                        continue
                    action = _guarded("reply", episode, lambda e=episode, r=reply: e.take_reply(str(r)), where)
                    if action is not None and episode.running:
                        jobs.append((episode, action))
                texts = pool.map(lambda job: _guarded("action", job[0], lambda: job[0].act(job[1]), where), jobs)
                for (episode, _), text in zip(jobs, texts):
                    if episode.running:
                        episode.take_observation(text)
                running = [episode for episode, _ in jobs if episode.running]

            def finish(index_episode):
                index, episode = index_episode
                if episode.failure is None:
                    result = _guarded("scoring", episode, episode.score, where)
                    if result is not None:
                        results[index] = result
                episode.seconds = time.monotonic() - episode.started

            list(pool.map(finish, enumerate(episodes)))
        finally:
            list(pool.map(lambda e: _tear_down(e, where), episodes))
    out = []
    for index, episode in enumerate(episodes):
        result = results.get(index)
        if result is None:
            result = episode.failed_result()
        elif result.seconds == 0.0:
            result = dataclasses.replace(result, seconds=episode.seconds)
        out.append(result)
    return out


def _tear_down(episode: Episode, where: str) -> None:
    try:
        episode.tear_down()
    except Exception as exc:
        log.warning("%s: tearing down item %s failed: %s: %s", where, episode.item_id, type(exc).__name__, exc)
