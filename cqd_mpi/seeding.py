"""Seeded randomness: every random draw of generation t comes from a stream keyed by (seed, t, purpose).

A resumed run therefore repeats an uninterrupted one exactly, with no generator state to save.
"""

import zlib

import numpy as np
import torch


def _purpose_key(purpose: str) -> int:
    return zlib.crc32(purpose.encode("utf-8"))


def seed_sequence(seed: int, generation: int, purpose: str) -> np.random.SeedSequence:
    if seed < 0 or generation < 0:
        raise ValueError(f"seed and generation must be >= 0, got seed={seed}, generation={generation}")
    return np.random.SeedSequence([int(seed), int(generation), _purpose_key(purpose)])


def numpy_rng(seed: int, generation: int, purpose: str) -> np.random.Generator:
    """A numpy Generator for one (seed, generation, purpose) stream."""
    return np.random.default_rng(seed_sequence(seed, generation, purpose))


def derive_seed(seed: int, generation: int, purpose: str) -> int:
    """A 63-bit integer seed for libraries that take one (torch)."""
    return int(seed_sequence(seed, generation, purpose).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch Generator seeded with an integer from derive_seed."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen
