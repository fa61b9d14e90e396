"""Small real runs for the analysis, plot and export tests: K = 2, 3 and 4 probe tasks over the
tiny Llama family, each run once per test session and shared read-only by the modules that
ask for it; plus a run interrupted part-way, as a run in progress leaves its run dir."""

from __future__ import annotations

from pathlib import Path

from cqd_mpi.run import config as config_mod
from cqd_mpi.runtime.launch import conduct
from tests.conftest import perturbed_copy, probe_config, write_config

TASKS = ("alpha", "beta", "gamma", "delta")
GENERATIONS = 8
SHAPES = {2: {"n_bins": 3}, 3: {"n_bins": 4}, 4: {"n_bins": 3}}
_finished: dict[int, Path] = {}


def family_of(tiny_family: dict, root: Path, k: int) -> dict:
    """The first k experts of the tiny family; a fourth is the base plus seeded noise, as the others."""
    experts = dict(tiny_family["experts"])
    for i, name in enumerate(TASKS[len(experts):k], start=len(experts)):
        experts[name] = perturbed_copy(tiny_family["base"], root / f"expert-{name}", seed=i + 1, scale=0.25)
    return {"base": tiny_family["base"], "experts": {n: experts[n] for n in TASKS[:k]}}


def run_config(tiny_family: dict, root: Path, k: int, **overrides) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = probe_config(family_of(tiny_family, root, k), root / "run",
                          **{"qd.generations": GENERATIONS, "qd.n_bins": SHAPES[k]["n_bins"], **overrides})
    for task in config["tasks"]:
        task["settings"]["n_items"] = 16
    return write_config(root / "config.yaml", config)


def finished_run(tmp_path_factory, tiny_family: dict, k: int) -> Path:
    """RUN_DIR of a finished K-task run (built on first use in the session)."""
    if k not in _finished:
        root = tmp_path_factory.mktemp(f"analysis-k{k}")
        config = config_mod.load(run_config(tiny_family, root, k))
        assert conduct(config, echo=lambda _line: None) == "done"
        _finished[k] = root / "run"
    return _finished[k]


class JobKilled(Exception):
    """Ends a run in the middle, as a killed job would, right after a checkpoint."""


def interrupted_run(root: Path, tiny_family: dict, *, after_generation: int, phase: str = "search") -> Path:
    """RUN_DIR of a K = 3 run whose job died right after a checkpoint (what a reader sees of a run
    in progress): the one of generation `after_generation`, or with phase "init" the one after
    the first expert's initial evaluation."""

    def echo(line: str) -> None:
        if phase == "init" and line.startswith("init") and "expert" in line:
            raise JobKilled(line)
        if line.startswith("gen ") and int(line.split()[1].split("/")[0]) >= after_generation:
            raise JobKilled(line)

    config = config_mod.load(run_config(tiny_family, root, 3))
    try:
        conduct(config, echo=echo)
    except JobKilled:
        return root / "run"
    raise AssertionError(f"the run finished before generation {after_generation}")
