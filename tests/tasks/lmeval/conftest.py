"""Shared set-ups of the lm-eval tests: the task YAMLs with their data (tests/fixtures/lmeval),
an engine on the tiny base, and lm-eval's own HFLM reference, each built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "lmeval"
TASKS = ("cqd_mc", "cqd_gen", "cqd_ll", "cqd_roll")

lm_eval = pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'cqd_mpi[lm-eval]'")
pytest.importorskip("accelerate", reason="needs the lm-eval extra: pip install 'cqd_mpi[lm-eval]'")


def write_task_dir(out: Path) -> Path:
    """The fixture YAMLs with DATA_DIR pointing at their JSONL files (lm-eval reads data paths
    relative to the working directory, so the copies name them absolutely)."""
    out.mkdir(parents=True, exist_ok=True)
    for yaml in FIXTURES.glob("*.yaml"):
        (out / yaml.name).write_text(yaml.read_text().replace("DATA_DIR", str(FIXTURES)))
    return out


@pytest.fixture(scope="session")
def lmeval_dir(tmp_path_factory) -> Path:
    return write_task_dir(tmp_path_factory.mktemp("lmeval-tasks"))


@pytest.fixture(scope="session", autouse=True)
def offline():
    """No test here may reach the Hugging Face Hub."""
    import os

    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def hf_engine(tiny_family):
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings

    return TransformersEngine(tiny_family["base"], device="cpu", dtype="float32",
                              settings=TransformersSettings(batch_size=8))


def evaluate_all(model, lmeval_dir: Path, tasks=TASKS, **kwargs) -> dict:
    """lm_eval.simple_evaluate on the fixture tasks (default: all four), per-sample logs kept."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False, include_path=str(lmeval_dir))
    return simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, log_samples=True,
                           bootstrap_iters=0, **kwargs)


@pytest.fixture(scope="session")
def hflm_reference(tiny_family, lmeval_dir) -> dict:
    """lm-eval's own HFLM on the tiny base: the reference every adapter result must equal."""
    return evaluate_all("hf", lmeval_dir, model_args=f"pretrained={tiny_family['base']},dtype=float32",
                        batch_size=8, device="cpu")
