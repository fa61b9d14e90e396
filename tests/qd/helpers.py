"""What the search-core tests share: a search over three made-up tasks, seeded scores, the loop
that drives ask/tell to the end, and an exact comparison of state trees."""

from __future__ import annotations

import dataclasses

import numpy as np

from cqd_mpi.qd.coefficients import CoefficientSearch
from cqd_mpi.qd.cycleqd import CycleQD
from cqd_mpi.qd.params import SearchParams
from cqd_mpi.qd.records import make_splits
from cqd_mpi.qd.search import Search

NAMES = ("code", "os", "db")


def splits():
    return make_splits({n: [f"{n}{i}" for i in range(10)] for n in NAMES}, seed=0)


def make_core(method=CycleQD, **kwargs):
    """A search of `method` over NAMES: SearchParams fields and the method's settings by name
    in kwargs, the rest for the Search constructor."""
    def take(cls, defaults=()):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**dict(defaults), **{k: kwargs.pop(k) for k in list(kwargs) if k in names}})

    params = take(SearchParams, {"generations": 12, "seed": 5, "n_bins": 5})
    strategy = method(take(method.Settings))
    defaults = dict(task_names=NAMES, base_path="/models/base",
                    expert_paths=[f"/models/{n}" for n in NAMES], splits=splits())
    defaults.update(kwargs)
    return Search(params=params, strategy=strategy, **defaults)


def fake_scores(model_id: int) -> np.ndarray:
    return np.random.default_rng(1000 + model_id).random(3)


def run(core, scorer=fake_scores, stop_after=None):
    told = []
    while not core.done:
        job = core.ask()
        assert job is not None
        told.append(core.tell(job.model_id, scorer(job.model_id)))
        if stop_after is not None and len(told) == stop_after:
            break
    return told


def smooth_scores(core):
    """Scores that depend on a candidate's coefficients, so the optimizers have a slope to follow;
    other models get seeded noise."""
    def score(model_id):
        record = core.models[model_id]
        if np.all(np.isfinite(record.coefficients)):
            c = record.coefficients
            return np.clip([0.6 - (c[0] - 0.5) ** 2, 0.5 - (c[1] - 0.2) ** 2, 0.4 + 0.1 * c[2] - c.sum() * 0.05], 0, 1)
        return np.random.default_rng(1000 + model_id).random(3)
    return score


def make(cls, **kwargs):
    if issubclass(cls, CoefficientSearch):
        kwargs = {"population": 4, "sigma0": 0.2, **kwargs}
    return make_core(cls, **kwargs)


def run_all(core):
    score = smooth_scores(core)
    told = []
    while not core.done:
        job = core.ask()
        assert job is not None
        if job.recipe.kind == "stored":
            assert core.models[job.model_id].kind in ("base", "expert", "child"), "a stored job needs saved weights"
        told.append(core.tell(job.model_id, score(job.model_id)))
    return told


def assert_trees_equal(a, b, path="/"):
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), path
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for key in a:
            assert_trees_equal(a[key], b[key], f"{path}{key}/")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, path
