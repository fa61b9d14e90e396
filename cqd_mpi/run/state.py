"""Where the CycleQD state lives between generations: in memory or in an HDF5 file.

Both backends store the tree of `CycleQD.state_dict()` (schema v1, documented in the
README) and give it back unchanged. The HDF5 backend writes a new file next to the old
one, fsyncs it and renames it into place, keeping the previous checkpoint as state.h5.bak,
so the file on disk is always a complete checkpoint, readers never block the writer, and a
truncated or corrupt state.h5 falls back to the backup.
"""

from __future__ import annotations

import abc
import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cqd_mpi import __version__, faults
from cqd_mpi.errors import StateError

SCHEMA_VERSION = 1
log = logging.getLogger("cqd_mpi.run.state")


class StateBackend(abc.ABC):
    """Save and load a state tree; `attrs` are extra root attributes (config text, world size)."""

    @abc.abstractmethod
    def save(self, tree: Mapping[str, Any], *, attrs: Mapping[str, Any] | None = None) -> None: ...

    @abc.abstractmethod
    def load(self) -> dict[str, Any] | None:
        """The last saved tree, or None if nothing was ever saved."""


class MemoryBackend(StateBackend):
    """Keeps a deep copy of the tree; for tests and for runs that need no checkpoint."""

    def __init__(self):
        self._tree: dict[str, Any] | None = None

    def save(self, tree, *, attrs=None):
        tree = copy.deepcopy(dict(tree))
        tree["attrs"] = {**tree.get("attrs", {}), **_root_attrs(attrs)}
        self._tree = tree

    def load(self):
        return copy.deepcopy(self._tree)


class HDF5Backend(StateBackend):
    """state.h5 written atomically, with state.h5.bak holding the previous checkpoint."""

    def __init__(self, path: str | Path, *, keep_backup: bool = True):
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self.keep_backup = keep_backup

    def save(self, tree, *, attrs=None):
        import h5py

        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                _write_group(f, tree)
                for key, value in _root_attrs(attrs).items():
                    f.attrs[key] = _attr_value(value)
            _fsync(tmp)
            faults.point("checkpoint")
            if self.keep_backup and self.path.exists():
                link = self.backup.with_name(f"{self.backup.name}.tmp-{os.getpid()}")
                link.unlink(missing_ok=True)
                os.link(self.path, link)
                os.replace(link, self.backup)
            os.replace(tmp, self.path)
            _fsync(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self):
        if not self.path.exists() and not self.backup.exists():
            return None
        try:
            return read_state(self.path)
        except StateError as exc:
            if not self.backup.exists():
                raise
            log.warning("%s; falling back to the previous checkpoint %s", exc, self.backup)
            try:
                return read_state(self.backup)
            except StateError as exc_bak:
                raise StateError(f"{exc}; and the backup is unusable too: {exc_bak}") from None


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a state file into a tree, checking its schema version; clear StateError otherwise."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise StateError(f"{path} does not exist")
    try:
        with h5py.File(path, "r", locking=False) as f:
            version = f.attrs.get("schema_version")
            if version is None:
                raise StateError(f"{path} is not a cqd_mpi state file (no schema_version attribute)")
            if int(version) != SCHEMA_VERSION:
                raise StateError(
                    f"{path} has state schema version {int(version)}; this cqd_mpi ({__version__}) "
                    f"reads version {SCHEMA_VERSION}"
                )
            return _read_group(f)
    except StateError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise StateError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _root_attrs(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "package_version": __version__, **(extra or {})}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _attr_value(value: Any) -> Any:
    import h5py

    if _is_str_list(value):
        return np.array(value, dtype=h5py.string_dtype())
    if isinstance(value, bool):
        return np.bool_(value)
    return value


def _write_group(group, tree: Mapping[str, Any]) -> None:
    import h5py

    for key, value in tree.items():
        if key == "attrs":
            for name, attr in value.items():
                group.attrs[name] = _attr_value(attr)
        elif isinstance(value, Mapping):
            _write_group(group.create_group(key), value)
        elif _is_str_list(value):
            group.create_dataset(key, data=np.array(value, dtype=object), dtype=h5py.string_dtype(), shape=(len(value),))
        else:
            group.create_dataset(key, data=np.asarray(value))


def _read_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _read_group(group) -> dict[str, Any]:
    import h5py

    tree: dict[str, Any] = {"attrs": {k: _read_attr(v) for k, v in group.attrs.items()}}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            tree[key] = _read_group(item)
        elif h5py.check_string_dtype(item.dtype) is not None:
            tree[key] = list(item.asstr()[...]) if item.shape != (0,) else []
        else:
            tree[key] = item[...]
    if not tree["attrs"] and group.name != "/":
        del tree["attrs"]
    return tree
