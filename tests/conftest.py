"""Shared fixtures: a family of tiny real Llama models (a base and experts) and run configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(1)


def perturbed_copy(base_dir: Path, out_dir: Path, *, seed: int, scale: float) -> Path:
    """An 'expert': the base plus seeded Gaussian noise on every 2-D matrix, saved by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict:
    """A tiny random Llama base and three experts (base + noise), as HF dirs."""
    from cqd_mpi.engines.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("family")
    base = build_tiny_llama(root / "base", seed=0, hidden_size=32, num_layers=2, num_heads=2)
    experts = {name: perturbed_copy(base, root / f"expert-{name}", seed=i + 1, scale=0.25)
               for i, name in enumerate(("alpha", "beta", "gamma"))}
    return {"base": base, "experts": experts}


@pytest.fixture(scope="session")
def bf16(tmp_path_factory) -> dict:
    """tests.tiny_llama.family in bf16 (a base and three experts, sharded three ways), built
    once and shared read-only by the weight, basis and merge-command tests."""
    from tests.tiny_llama import family

    return family(tmp_path_factory.mktemp("bf16-family"), torch.bfloat16)


@pytest.fixture(scope="session")
def vl_family(tmp_path_factory) -> dict:
    """tests.tiny_llava.vl_family: a tiny text base, two text experts and a tiny LLaVA expert
    embedding the base's language model (extra vocabulary rows), and TextVQA-style data."""
    from tests.tiny_llava import vl_family

    return vl_family(tmp_path_factory.mktemp("vl-family"))


def probe_config(family: dict, run_dir: Path, **overrides) -> dict:
    """A run config over the tiny family with three probe tasks (tests/runtime/probe_task.py)."""
    config = {
        "base": str(family["base"]),
        "experts": [{"task": name, "path": str(path)} for name, path in family["experts"].items()],
        "tasks": [{"name": name, "kind": "tests.runtime.probe_task:ProbeTask",
                   "settings": {"n_items": 24, "salt": name}, "batch_size": 5}
                  for name in family["experts"]],
        "qd": {"generations": 6, "n_bins": 4, "mutation": {"kind": "svd", "rank": 4, "w_max": 0.3}},
        "runtime": {"run_dir": str(run_dir), "seed": 3},
        "engine": {"device": "cpu", "settings": {"batch_size": 8}},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            config.setdefault(section, {})[leaf] = value
        else:
            config[section] = value
    return config


def small_config(family: dict, run_dir: Path, **overrides) -> dict:
    """probe_config with 16 items per task: the runtime, job and method tests' run."""
    config = probe_config(family, run_dir, **overrides)
    for task in config["tasks"]:
        task["settings"]["n_items"] = 16
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def subprocess_env(**extra) -> dict:
    """Environment for `python -m cqd_mpi` subprocesses: the repo importable, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("CQD_MPI_FAULT", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Tests that share a machine-wide resource run in one xdist group, one at a time, on one worker:
# processes found by scanning /proc (evalplus harnesses in "code-judges", which also holds the
# whole-run test of the code, DB and OS tasks; OS environments, containers and MariaDB users in
# "sandboxes": a scan in a module of one group for processes another group starts must be
# scoped to its own, as test_agentbench_run scopes OS environments by its runs' environment),
# the SLURM cluster,
# the multi-node cluster (env/slurm-multinode.sh, apart from the one-node cluster of "slurm":
# its tests mostly wait for their jobs, beside the other groups), vLLM's share of host memory.
# Every other module is a group of its own, so its module-scoped set-ups (runs, models) are
# built once. MPI jobs are not a shared resource: each mpiexec picks its own ports, and a rank
# only removes shared-memory segments that no live process maps (runtime/shm.py), so two MPI
# modules may run at once. The first group whose prefix matches wins. Checked by
# tests/test_groups.py.
SHARED_RESOURCES = {
    "multinode": ("jobs/test_multinode.py",),
    "code-judges": ("tasks/test_agentbench_run.py", "tasks/test_mbpp.py", "tasks/test_mbpp_authors.py",
                    "tasks/test_protocols.py", "sandboxes/test_evalplus_harness.py", "commands/test_check_tasks.py"),
    "sandboxes": ("sandboxes/", "tasks/test_dbbench.py", "tasks/test_os_interaction.py", "tasks/test_os_tamper.py",
                  "commands/test_doctor.py", "env/"),
    "slurm": ("jobs/",),
    "vllm": ("engines/test_vllm.py",),
}


MARKER_GROUPS = {"docker": "sandboxes"}


def start_order(group: str, markers: set[str]) -> int:
    """When a group starts (setup.cfg turns xdist's by-size reordering off): the shared
    resources first, as they are the longest, then the modules that start jobs (`mpi`, `slow`),
    then the rest, which fill the workers' last minutes."""
    if group in SHARED_RESOURCES:
        return 0
    return 1 if markers & {"mpi", "slow"} else 2


def xdist_group_of(relative_path: str, markers: tuple[str, ...] = ()) -> str:
    """The xdist group of a test, by its module's path under tests/, then by its markers
    (a module elsewhere whose test starts containers joins that group)."""
    for group, prefixes in SHARED_RESOURCES.items():
        if relative_path.startswith(prefixes):
            return group
    for marker in markers:
        if marker in MARKER_GROUPS:
            return MARKER_GROUPS[marker]
    return relative_path


def missing_distributions(extra: str) -> list[str]:
    """The distributions of setup.cfg's `extra` that are not installed (setup.cfg is the one list)."""
    import configparser
    import importlib.metadata
    import re

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    requirements = parser["options.extras_require"][extra].split()
    missing = []
    for requirement in requirements:
        name = re.split(r"[<>=!~\[;]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item):
    """A test marked `extra(NAME)` needs setup.cfg's extra NAME: where part of it is missing it is
    skipped with the install line, or fails under CQD_REQUIRE_EXTRAS=1 (CI installs every extra)."""
    for mark in item.iter_markers("extra"):
        missing = missing_distributions(mark.args[0])
        if missing:
            why = (f"needs the '{mark.args[0]}' extra ({', '.join(missing)} not installed): "
                   f"pip install 'cqd_mpi[{mark.args[0]}]'")
            if os.environ.get("CQD_REQUIRE_EXTRAS") == "1":
                pytest.fail(f"CQD_REQUIRE_EXTRAS=1, but this test {why}", pytrace=False)
            pytest.skip(why)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU: where torch sees none they are skipped with the reason shown
    in the summary, and run with `python -m pytest -m cuda` on a GPU node (docs/gpu.md).
    Under xdist, each test joins its group (SHARED_RESOURCES), and the groups are ordered
    by start_order."""
    if config.pluginmanager.hasplugin("xdist"):
        groups, group_markers = {}, {}
        for item in items:
            relative = Path(str(item.fspath)).resolve().relative_to(REPO / "tests").as_posix()
            markers = tuple(mark.name for mark in item.iter_markers())
            group = xdist_group_of(relative, markers)
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item] = group
            group_markers.setdefault(group, set()).update(markers)
        first = {}
        for index, item in enumerate(items):
            first.setdefault(groups[item], index)
        items.sort(key=lambda item: (start_order(groups[item], group_markers[groups[item]]), first[groups[item]]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, and torch sees none here (docs/gpu.md says how they ran)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
