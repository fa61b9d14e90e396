"""What the demo tests share: a small training recipe (seconds, not minutes) and a digest of a
directory's files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cqd_mpi.demo import llm as demo

SMALL = demo.TrainingRecipe(n_items=24, max_length=6, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, batch_size=16, base_steps=30, expert_steps=8)


def digests(directory: Path) -> dict[str, str]:
    """The sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
