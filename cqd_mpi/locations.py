"""Where cqd_mpi keeps files outside a run directory: the user's cache.

`$XDG_CACHE_HOME/cqd_mpi` (default ~/.cache/cqd_mpi) holds the demo's trained models and
the expert SVD bases of `mutation.basis: expert`; a run and the `merge` command share them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$XDG_CACHE_HOME/cqd_mpi, or ~/.cache/cqd_mpi."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cqd_mpi"


def basis_cache(configured: str | os.PathLike | None = None) -> Path:
    """The expert SVD basis cache: `runtime.basis_cache` (or `merge --basis-cache`) if given."""
    return Path(configured) if configured else cache_root() / "svd-basis"
