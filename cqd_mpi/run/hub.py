"""Models named as researchers name them: a hub id (`org/name`, `org/name@revision`) resolved to
its snapshot in the local Hugging Face cache, never downloaded (compute nodes have no network;
HF_HUB_OFFLINE stays set).

The config keeps the resolved snapshot directory (`.../models--org--name/snapshots/<commit>`),
so the frozen config and state.h5 record the exact revision a run merged, and a resume whose id
now resolves to another snapshot is a changed `base` or expert path, refused as any such change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cqd_mpi.errors import ConfigError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_hub_id(value: str, root: Path) -> bool:
    """Whether `value` names a hub model rather than a directory: it has the form org/name[@rev]
    and no such path exists (relative to `root` or absolute)."""
    if not HUB_ID.match(value) or value.startswith(("./", "../")):
        return False
    path = Path(value).expanduser()
    return not (path if path.is_absolute() else root / path).exists()


def cache_dir() -> str:
    """Where huggingface_hub looks: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve(value: str, where: str) -> str:
    """The snapshot directory of hub id `value` in the local cache; ConfigError, in one line saying
    how to fetch it on a login node, when the cache does not hold it."""
    from huggingface_hub import snapshot_download

    match = HUB_ID.match(value)
    assert match is not None
    repo, revision = match.group("repo"), match.group("revision")
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, a broken ref, a malformed id: all mean "not here"
        fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")
        raise ConfigError(
            f"{where}: {value} is neither a directory nor a model in the local Hugging Face cache "
            f"{cache_dir()} ({type(exc).__name__}); nothing is downloaded on a compute node: fetch it on a "
            f"login node with `{fetch}` (the same HF_HOME or HF_HUB_CACHE), then rerun") from None
