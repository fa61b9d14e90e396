"""The search parameters: one frozen object, read from the config, given whole to the search,
written whole to state.h5 (one root attribute per field, under the field's name) and read back whole.

Adding a parameter is one field here (with its check in `__post_init__`), the line of
run/config.py that reads it from the config, and the code that uses it: the state file, the
resume and the README's table (checked by tests/qd/test_params.py) follow from the fields.
A method's own settings are the same kind of object, declared by its strategy (`Strategy.Settings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def coerce(settings: Any) -> None:
    """Cast every field of a frozen dataclass to its annotated type (int, float, str, bool),
    so that `alpha_low: 0` in YAML and 0.0 are the same parameter, stored alike."""
    casts = {"int": int, "float": float, "str": str, "bool": bool}
    for field in dataclasses.fields(settings):
        cast = casts.get(str(field.type))
        if cast is None:
            raise TypeError(f"{type(settings).__name__}.{field.name}: a setting must be int, float, str or bool")
        object.__setattr__(settings, field.name, cast(getattr(settings, field.name)))


def to_attrs(settings: Any) -> dict[str, Any]:
    """The root attributes of state.h5 that store `settings`: one per field."""
    return dataclasses.asdict(settings)


def from_attrs(cls: type[T], attrs: Mapping[str, Any], where: str = "state.h5") -> T:
    """`cls` as `to_attrs` stored it, with the checks of a new one."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in attrs]
    if missing:
        raise ValueError(f"{where} lacks the root attributes {missing} of {cls.__name__}")
    return cls(**{n: attrs[n] for n in names})


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """What every search method reads: the budget, the seed, parent sampling, crossover,
    in-flight children and the archives' bins (README: Config, `qd` and `runtime`)."""

    generations: int
    """The search budget: models evaluated in the search phase."""
    seed: int
    sampling: str = "elite"
    """elite | random."""
    alpha_low: float = 0.5
    alpha_high: float = 0.8
    crossover_mu: float = 1.0
    crossover_sigma: float = 0.03
    pipeline_depth: int = 0
    """Children sampled ahead: child t is sampled right after generation t-1-d is told."""
    n_bins: int = 15
    """Bins per axis of an auto-binned task."""
    bc_lower_factor: float = 0.85
    bc_upper_factor: float = 1.15
    test_every: int = 0
    """Every this many models evaluated, the would-be final model is scored on the test split
    (a budget-curve point, not counted in the budget); 0: never."""

    @classmethod
    def from_sections(cls, *sections: Mapping[str, Any]) -> SearchParams:
        """From config sections as dicts (run/config.py: runtime, then qd, the later winning):
        each field is the key of its name, nested keys joined by '_' (crossover.mu is crossover_mu)."""
        flat: dict[str, Any] = {}

        def walk(tree: Mapping[str, Any], prefix: str) -> None:
            for key, value in tree.items():
                if isinstance(value, Mapping):
                    walk(value, f"{prefix}{key}_")
                else:
                    flat[prefix + key] = value

        for section in sections:
            walk(section, "")
        return cls(**{f.name: flat[f.name] for f in dataclasses.fields(cls)})

    def __post_init__(self):
        coerce(self)
        if self.sampling not in ("elite", "random"):
            raise ValueError(f"sampling must be 'elite' or 'random', got {self.sampling!r}")
        for name in ("generations", "seed", "pipeline_depth", "test_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        if not self.alpha_low >= 0:
            raise ValueError(f"alpha_low must be >= 0, got {self.alpha_low}")
