"""The demo tests' shared build: the LLM demo at the small size, which the VQA demo reuses."""

from __future__ import annotations

import pytest

from cqd_mpi.demo import llm as demo
from tests.demo.helpers import SMALL


@pytest.fixture(scope="session")
def small_llm(tmp_path_factory) -> demo.DemoModels:
    """The LLM demo's models at the SMALL recipe, in a cache dir of their own (seconds)."""
    return demo.build(SMALL, cache_dir=tmp_path_factory.mktemp("demo-cache"))
