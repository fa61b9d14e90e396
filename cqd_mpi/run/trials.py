"""The paper's comparisons as runs of one config: Table 2's five trials and Table 1's
learnt-coefficient baselines, each a set of overrides of the config's `qd` section.

Every trial keeps everything else of the config (models, tasks, budget `qd.generations`,
mutation rank and w_max, bins, runtime), so the runs differ only in what the trial names;
the naive average (Table 1, model 7) is in every run's final phase. `write_trials` writes
one config per trial and seed, each with its own run dir.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import yaml

from cqd_mpi.errors import ConfigError
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.rundir import atomic_write_text

TRIALS: dict[str, tuple[str, dict]] = {
    "qd": ("Table 2, trial 0: QD + no mutation + random sampling",
           {"method": "qd", "mutation.kind": "none", "sampling": "random"}),
    "cycleqd-none-random": ("Table 2, trial 1: CycleQD + no mutation + random sampling",
                            {"method": "cycleqd", "mutation.kind": "none", "sampling": "random"}),
    "cycleqd-gaussian-random": ("Table 2, trial 2: CycleQD + Gaussian mutation + random sampling",
                                {"method": "cycleqd", "mutation.kind": "gaussian", "sampling": "random"}),
    "cycleqd-svd-random": ("Table 2, trial 3: CycleQD + SVD mutation + random sampling",
                           {"method": "cycleqd", "mutation.kind": "svd", "sampling": "random"}),
    "cycleqd": ("Table 2, trial 4 = Table 1, model 11: CycleQD + SVD mutation + elite sampling",
                {"method": "cycleqd", "mutation.kind": "svd", "sampling": "elite"}),
    "cma-es": ("Table 1, model 9: merging, coefficients learnt with CMA-ES", {"method": "cma-es"}),
    "nsga2": ("Table 1, model 10: merging, coefficients learnt with NSGA-II", {"method": "nsga2"}),
    "policy-gradient": ("Table 1, model 8: merging, coefficients learnt by policy gradient",
                        {"method": "policy-gradient"}),
}


def trial_config(data: dict, trial: str, *, seed: int, run_dir: str | Path) -> dict:
    """`data` (a config as a dict) with the trial's qd overrides, the seed and the run dir."""
    if trial not in TRIALS:
        raise ConfigError(f"unknown trial {trial!r}; expected one of {', '.join(TRIALS)}")
    out = copy.deepcopy(data)
    qd = out.setdefault("qd", {})
    for key, value in TRIALS[trial][1].items():
        node = qd
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    out.setdefault("runtime", {}).update(seed=int(seed), run_dir=str(run_dir))
    return out


def write_trials(config_path: str | Path, *, seeds: Sequence[int], out_dir: str | Path,
                 trials: Sequence[str] | None = None) -> list[Path]:
    """Write OUT/<trial>-seed<S>.yaml (run dir OUT/<trial>-seed<S>) for every trial and seed,
    trial by trial; returns the paths in that order."""
    base = config_mod.load(config_path).to_dict()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for trial in trials or list(TRIALS):
        for seed in seeds:
            name = f"{trial}-seed{seed}"
            data = trial_config(base, trial, seed=seed, run_dir=out_dir / name)
            config_mod.from_dict(data)
            path = out_dir / f"{name}.yaml"
            atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
            paths.append(path)
    return paths
