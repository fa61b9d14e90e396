"""sha256 of files: one block reader for the run's input digests (run/integrity.py) and the
tasks' data digests (tasks/base.py), below both."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 16 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, as "sha256:<hex>"."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
