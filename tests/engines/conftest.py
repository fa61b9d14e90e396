"""Tiny random Llama dirs (built offline) shared by the engine tests."""

import pytest

from cqd_mpi.engines.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Two untied tiny Llamas with different seeds and one with tied embeddings."""
    root = tmp_path_factory.mktemp("tiny-llama")
    return {
        "a": build_tiny_llama(root / "a", seed=1),
        "b": build_tiny_llama(root / "b", seed=2),
        "tied": build_tiny_llama(root / "tied", seed=3, tie_word_embeddings=True),
    }


@pytest.fixture(scope="session")
def live_a(tiny_dirs):
    from cqd_mpi.engines.hf import TransformersEngine

    return TransformersEngine(tiny_dirs["a"], device="cpu")
