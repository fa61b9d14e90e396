import numpy as np
import pytest

from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
from cqd_mpi.errors import BackendUnavailable, TaskError
from cqd_mpi.qd.records import make_splits
from cqd_mpi.run.evaluation import combine, evaluate_chunks, make_chunks, shard
from cqd_mpi.tasks.base import ItemResult, TaskContext
from tests.runtime.probe_task import ProbeSettings, ProbeTask


@pytest.fixture(scope="module")
def setup(tiny_family):
    tasks = {name: ProbeTask(name=name, data=None, settings=ProbeSettings(n_items=13, salt=name),
                             context=TaskContext()) for name in ("a", "b")}
    splits = make_splits({n: t.item_ids() for n, t in tasks.items()}, seed=0)
    model = TransformersEngine(tiny_family["base"], device="cpu", settings=TransformersSettings(batch_size=4))
    return tasks, splits, model


def test_chunks_cover_each_split_in_order():
    splits = make_splits({"a": [str(i) for i in range(10)], "b": [str(i) for i in range(7)]}, seed=1)
    chunks = make_chunks(splits, "search", {"a": 2, "b": 3})
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [i for c in chunks if c.task == "a" for i in c.item_ids] == list(splits["a"].search)
    assert max(len(c.item_ids) for c in chunks if c.task == "b") == 3
    workers = [shard(chunks, 3, w) for w in range(3)]
    assert sorted(c.index for w in workers for c in w) == [c.index for c in chunks]


@pytest.mark.parametrize("n_workers", [2, 3, 5])
def test_scores_do_not_depend_on_the_number_of_workers(setup, n_workers):
    tasks, splits, model = setup
    chunks = make_chunks(splits, "test", {"a": 3, "b": 2})
    single = combine(tasks, ["a", "b"], chunks, evaluate_chunks(tasks, model, chunks))
    merged = {}
    for worker in range(n_workers):
        merged.update(evaluate_chunks(tasks, model, shard(chunks, n_workers, worker)))
    sharded = combine(tasks, ["a", "b"], chunks, merged)
    np.testing.assert_array_equal(single.metrics, sharded.metrics)
    for name in ("a", "b"):
        np.testing.assert_array_equal(single.item_scores[name], sharded.item_scores[name])
    assert 0.0 < single.metrics.mean() < 1.0


def test_combine_counts_errors_by_class(setup):
    tasks, splits, _ = setup
    chunks = make_chunks(splits, "search", {"a": 100, "b": 100})
    results = {
        0: [ItemResult(i, 1.0 if k else 0.0, error=None if k else "timeout")
            for k, i in enumerate(chunks[0].item_ids)],
        1: [ItemResult(i, 0.0, error="sandbox") for i in chunks[1].item_ids],
    }
    scores = combine(tasks, ["a", "b"], chunks, results)
    assert scores.errors_by_class == {"timeout": 1, "sandbox": len(chunks[1].item_ids)}
    assert scores.n_errors == 1 + len(chunks[1].item_ids)
    assert scores.metrics[1] == 0.0
    assert scores.metrics[0] == pytest.approx((len(chunks[0].item_ids) - 1) / len(chunks[0].item_ids))


def test_a_task_that_returns_the_wrong_items_is_caught(setup):
    _, splits, model = setup

    class Shuffled(ProbeTask):
        def evaluate(self, model, item_ids):
            return list(reversed(super().evaluate(model, item_ids)))

    bad = {"a": Shuffled(name="a", data=None, settings=ProbeSettings(salt="a"), context=TaskContext())}
    chunks = make_chunks({"a": splits["a"]}, "search", {"a": 4})
    with pytest.raises(TaskError, match="expected one per item in order"):
        evaluate_chunks(bad, model, chunks)


class Fragile(ProbeTask):
    """Raises for the items named in `bad` (any batch holding one), or says the server is down."""

    bad: frozenset = frozenset()
    no_label: frozenset = frozenset()
    down = False

    def evaluate(self, model, item_ids):
        if self.down:
            raise BackendUnavailable("server 127.0.0.1:1 unreachable after 3 tries")
        if self.bad & set(item_ids):
            raise ValueError(f"unsupported format character in {sorted(self.bad & set(item_ids))}")
        if self.no_label & set(item_ids):
            raise TaskError(f"item {sorted(self.no_label & set(item_ids))} has no label statements to replay")
        return super().evaluate(model, item_ids)


def test_an_item_that_raises_is_that_items_error(setup, caplog):
    _, splits, model = setup
    good = {"a": ProbeTask(name="a", data=None, settings=ProbeSettings(salt="a"), context=TaskContext())}
    fragile = Fragile(name="a", data=None, settings=ProbeSettings(salt="a"), context=TaskContext())
    chunks = make_chunks({"a": splits["a"]}, "search", {"a": 4})
    fragile.bad = frozenset({chunks[0].item_ids[1]})
    fragile.no_label = frozenset({chunks[-1].item_ids[-1]})
    expected = combine(good, ["a"], chunks, evaluate_chunks(good, model, chunks))
    with caplog.at_level("ERROR", logger="cqd_mpi.run.evaluation"):
        scores = combine({"a": fragile}, ["a"], chunks, evaluate_chunks({"a": fragile}, model, chunks))
    assert scores.errors_by_class == {"exception:ValueError": 1, "exception:TaskError": 1}
    bad = [list(splits["a"].search).index(i) for i in (chunks[0].item_ids[1], chunks[-1].item_ids[-1])]
    assert list(scores.item_scores["a"][bad]) == [0.0, 0.0]
    others = ~np.isin(np.arange(len(scores.item_scores["a"])), bad)
    np.testing.assert_array_equal(scores.item_scores["a"][others], expected.item_scores["a"][others])
    assert "Traceback" in caplog.text and "unsupported format character" in caplog.text
    assert f"item {chunks[0].item_ids[1]}" in caplog.text


def test_a_backend_that_is_down_ends_the_evaluation(setup):
    _, splits, model = setup
    fragile = Fragile(name="a", data=None, settings=ProbeSettings(salt="a"), context=TaskContext())
    fragile.down = True
    chunks = make_chunks({"a": splits["a"]}, "search", {"a": 4})
    with pytest.raises(BackendUnavailable, match="unreachable after 3 tries"):
        evaluate_chunks({"a": fragile}, model, chunks)
