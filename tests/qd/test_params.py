"""The search parameters and a method's settings: one frozen object each, written to the state
whole and read back whole through the checks a new search runs; the README's table names them."""

import dataclasses
from pathlib import Path

import pytest

from cqd_mpi.errors import StateError
from cqd_mpi.qd.coefficients import CMAES, CoefficientSettings
from cqd_mpi.qd.params import SearchParams, from_attrs, to_attrs
from cqd_mpi.run.state import from_tree, to_tree
from tests.qd.helpers import make_core, run

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_state_table_names_every_parameter_and_setting():
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `/` attrs"))
    for cls in (SearchParams, CoefficientSettings):
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in row, field.name


def test_parameters_are_cast_checked_and_stored_whole():
    params = SearchParams(generations=3, seed=1, alpha_low=0, crossover_mu=1)
    assert type(params.alpha_low) is float and type(params.crossover_mu) is float
    assert from_attrs(SearchParams, to_attrs(params)) == params
    with pytest.raises(ValueError, match="sampling must be 'elite' or 'random', got 'best'"):
        SearchParams(generations=1, seed=0, sampling="best")
    with pytest.raises(ValueError, match=r"lacks the root attributes \['n_bins'\] of SearchParams"):
        from_attrs(SearchParams, {k: v for k, v in to_attrs(params).items() if k != "n_bins"})
    with pytest.raises(ValueError, match="population must be >= 2"):
        CoefficientSettings(population=1)


@pytest.mark.extra("baselines")
def test_a_restored_search_passes_the_checks_of_a_new_one():
    core = make_core(CMAES, generations=6, population=3)
    run(core, stop_after=5)
    tree = to_tree(core)
    restored = from_tree(tree)
    assert restored.params == core.params and restored.strategy.settings == core.strategy.settings
    for edit, message in [
        (lambda t: t["attrs"].update(sampling="best"), "sampling must be 'elite' or 'random'"),
        (lambda t: t["attrs"].update(population=1), "population must be >= 2"),
        (lambda t: t["attrs"].pop("alpha_high"), r"lacks the root attributes \['alpha_high'\]"),
        (lambda t: t["models"]["kind"].__setitem__(2, "child"), "expected the base and 3 experts"),
        (lambda t: t["models"]["kind"].__setitem__(5, "hybrid"), "'hybrid' is not a valid ModelKind"),
    ]:
        bad = to_tree(core)
        edit(bad)
        with pytest.raises(StateError, match=message):
            from_tree(bad)
