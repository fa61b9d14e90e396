"""state.h5's bytes: a tree of dicts written as HDF5 groups and read back, and the digest
every state file carries (run/state.py defines the tree; this module knows only HDF5)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CHECKSUM = "checksum"


def digest(root) -> str:
    """sha256 (hex) over every dataset (path, dtype, shape, bytes) and attribute of an open
    HDF5 file but the root's `checksum`, in name order: what `checksum` records."""
    import h5py

    digest = hashlib.sha256()

    def feed(label: str, value: Any) -> None:
        array = np.asarray(value)
        digest.update(f"{label}|{array.shape}|".encode())
        if array.dtype.kind in "OSU":
            for item in array.reshape(-1).tolist():
                data = item.encode() if isinstance(item, str) else bytes(item)
                digest.update(len(data).to_bytes(8, "little") + data)
        else:
            digest.update(array.dtype.str.encode() + np.ascontiguousarray(array).tobytes())

    def visit(group) -> None:
        for name in sorted(group.attrs):
            if not (group.name == "/" and name == CHECKSUM):
                feed(f"@{group.name}/{name}", group.attrs[name])
        for name in sorted(group):
            item = group[name]
            if isinstance(item, h5py.Group):
                visit(item)
            else:
                feed(item.name, item[()])

    visit(root)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def attr_value(value: Any) -> Any:
    import h5py

    if _is_str_list(value):
        return np.array(value, dtype=h5py.string_dtype())
    if isinstance(value, bool):
        return np.bool_(value)
    return value


def write_group(group, tree: Mapping[str, Any]) -> None:
    import h5py

    for key, value in tree.items():
        if key == "attrs":
            for name, attr in value.items():
                group.attrs[name] = attr_value(attr)
        elif isinstance(value, Mapping):
            write_group(group.create_group(key), value)
        elif _is_str_list(value):
            group.create_dataset(key, data=np.array(value, dtype=object), dtype=h5py.string_dtype(), shape=(len(value),))
        else:
            group.create_dataset(key, data=np.asarray(value))


def read_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def read_group(group) -> dict[str, Any]:
    import h5py

    tree: dict[str, Any] = {"attrs": {k: read_attr(v) for k, v in group.attrs.items()}}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            tree[key] = read_group(item)
        elif h5py.check_string_dtype(item.dtype) is not None:
            tree[key] = list(item.asstr()[...]) if item.shape != (0,) else []
        else:
            tree[key] = item[...]
    if not tree["attrs"] and group.name != "/":
        del tree["attrs"]
    return tree
