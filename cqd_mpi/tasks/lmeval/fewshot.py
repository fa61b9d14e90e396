"""Few-shot examples exactly as `lm_eval.simple_evaluate` draws them, for any chunk of documents.

simple_evaluate seeds each task's sampler with `fewshot_random_seed` (`set_fewshot_seed`),
then builds the requests of every document in document order, and each document's
`fewshot_context` draws its examples from that one generator: a document's examples depend
on how many documents were built before it. CycleQD scores any chunk of documents, on any
worker, so `FewshotDraws` replays lm-eval's draws for the whole task once (the task's own
`fewshot_context` on every document, in order, its sampler seeded as simple_evaluate seeds
it) and, while lm-eval builds a chunk's requests, hands each document the examples lm-eval
drew for it. An item's prompt is then lm-eval's own, whatever the sharding or batching.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from cqd_mpi.errors import TaskError


class FewshotDraws:
    """The few-shot examples lm-eval draws for each document of one (leaf) lm-eval task."""

    def __init__(self, task: Any, *, num_fewshot: int | None, seed: int):
        """Set num_fewshot and the seed on `task` as simple_evaluate does (a task whose YAML
        pins 0 keeps 0; none given and none in the YAML is 0)."""
        if num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
        self.task = task
        self.seed = seed
        self._draws: list[Sequence[Any]] | None = None
        self._lock = threading.Lock()

    @property
    def num_fewshot(self) -> int:
        return int(self.task.get_config("num_fewshot") or 0)

    def draws(self) -> list[Sequence[Any]]:
        """Each document's examples, in document order (replayed on first use, then kept)."""
        if self._draws is None:
            task, sampler = self.task, self.task.sampler
            drawn: list[Sequence[Any]] = []
            sample = sampler.sample

            def record(*args, **kwargs):
                drawn.append(sample(*args, **kwargs))
                return drawn[-1]

            sampler.set_rnd(self.seed)
            sampler.sample = record
            try:
                for doc in task.eval_docs:
                    task.fewshot_context(doc, num_fewshot=self.num_fewshot)
            finally:
                del sampler.sample
                sampler.set_rnd(self.seed)
            if len(drawn) != len(task.eval_docs):
                raise TaskError(f"lm-eval task {task.config.task!r}: replaying its few-shot draws gave "
                                f"{len(drawn)} draws for {len(task.eval_docs)} documents")
            self._draws = drawn
        return self._draws

    @contextlib.contextmanager
    def building(self, doc_ids: Sequence[int]) -> Iterator[None]:
        """While lm-eval builds the requests of `doc_ids` (ascending: its order for `samples`),
        each document's fewshot_context gets the examples simple_evaluate drew for it."""
        if not self.num_fewshot or getattr(self.task, "sampler", None) is None:
            yield
            return
        with self._lock:
            draws = self.draws()
            task, sampler = self.task, self.task.sampler
            order = iter(doc_ids)
            current: list[int] = []

            def fewshot_context(doc, *args, **kwargs):
                doc_id = next(order, None)
                if doc_id is None or not _same(doc, task.eval_docs[doc_id]):
                    raise TaskError(f"lm-eval task {task.config.task!r}: documents were built out of the order "
                                    f"{list(doc_ids)[:5]}...; cannot give them lm-eval's few-shot examples")
                current[:] = [doc_id]
                return type(task).fewshot_context(task, doc, *args, **kwargs)

            task.fewshot_context = fewshot_context
            sampler.sample = lambda *args, **kwargs: list(draws[current[0]])
            try:
                yield
            finally:
                del task.fewshot_context
                del sampler.sample


def _same(doc: Any, other: Any) -> bool:
    """Equal documents (NaN fields included, which == does not find equal)."""
    return doc == other or json.dumps(doc, sort_keys=True, default=str) == json.dumps(other, sort_keys=True,
                                                                                      default=str)
