"""The run's weights checked against what they were, so a swapped file is refused, never used.

- The base and the experts: at the run's first start, the sha256 of each file the merge reads
  (the safetensors shards, their index, config.json) is recorded in state.h5 (root attribute
  `inputs`, under its checksum); every start and resume hashes them again and refuses a file
  that changed, naming it (`check_inputs`).
- A saved child: its tensors' digest (`weights_digest`) is in RUN_DIR/digests.json from its
  save; run/store.py checks it the first time this process reads the child, then trusts the
  files while their `stat_key` is unchanged (`FileKeys`). The key holds the inode and ctime,
  which the kernel sets on every write, rename over, or utime of a file and no process can set
  back, so a file changed after its check has another key and is hashed again. The hash per
  child is then paid once per process (the save already computes it), not once per read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from cqd_mpi.digests import file_digest
from cqd_mpi.errors import StateError
from cqd_mpi.merging.checkpoint import INDEX_FILE
from cqd_mpi.merging.weights import ModelDir

INPUTS_ATTR = "inputs"
"""state.h5's root attribute: JSON {file: "sha256:..."} of the base's and the experts' files."""


def weights_digest(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (so it does not
    depend on how the model is sharded)."""
    digest = hashlib.sha256()
    tensors = dict(ModelDir(model_dir).tensors())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def input_files(model_dir: Path) -> list[Path]:
    """The files of a model dir the merge reads: its safetensors shards, their index, config.json."""
    model = ModelDir(model_dir)
    files = [shard.path for shard in model.files]
    files += [p for p in (model.path / INDEX_FILE, model.path / "config.json") if p.is_file()]
    return sorted({Path(os.path.abspath(p)) for p in files})


def stat_key(path: Path) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime."""
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class FileKeys:
    """The stat keys of the files of models this process has verified: a model is hashed again
    only when one of its files' keys differs from when it was checked."""

    def __init__(self):
        self._keys: dict[int, tuple] = {}

    @staticmethod
    def of(model_dir: Path) -> tuple:
        return tuple(sorted((p.name, stat_key(p)) for p in Path(model_dir).iterdir() if p.is_file()))

    def current(self, m: int, model_dir: Path) -> bool:
        return m in self._keys and self._keys[m] == self.of(model_dir)

    def remember(self, m: int, key: tuple) -> None:
        self._keys[m] = key

    def forget(self, m: int) -> None:
        self._keys.pop(m, None)


def check_inputs(models: Mapping[str, Path], recorded: str | None, *, holder: str, root: Path | None = None,
                 force: bool = False, warn=None) -> tuple[str, list[str]]:
    """Hash the files of `models` (label -> model dir) and compare them with the digests
    `recorded` at the run's first start (the JSON text of state.h5's `inputs`; None when none
    were). Files under `root` (the run dir: models lifted there) are recorded relative to it, so
    a copied run dir holds the same record. Returns the JSON to record and the lines to report;
    raises StateError naming the first file that changed, is missing or is new, unless `force`
    (then it is reported and the new digests recorded)."""
    root = Path(os.path.abspath(root)) if root is not None else None

    def key(file: Path) -> str:
        return str(file.relative_to(root)) if root is not None and file.is_relative_to(root) else str(file)

    def where(name: str) -> Path:
        return root / name if root is not None and not Path(name).is_absolute() else Path(name)

    labels: dict[str, str] = {}
    for label, model_dir in models.items():
        for file in input_files(model_dir):
            labels.setdefault(key(file), label)
    old = json.loads(recorded) if recorded else None
    if old is not None:
        for name in sorted(set(old) - set(labels)):
            labels[name] = "no longer a file of the base or an expert"
    now = {name: file_digest(where(name)) for name in sorted(labels) if where(name).is_file()}
    text = json.dumps(now, sort_keys=True)
    if old is None:
        return text, []
    changes = list(_changes(old, now, labels, holder, where))
    if changes and not force:
        raise StateError(f"{changes[0]}: restore it and run again, and the state resumes as it was; or pass "
                         f"--force to go on with the weights as they are (results then differ from an "
                         f"uninterrupted run)" + (f" ({len(changes) - 1} more file(s) differ)" if len(changes) > 1 else ""))
    for line in changes:
        (warn or print)(f"{line} (--force: recorded as it is now)")
    return text, changes


def _changes(old: Mapping[str, str], now: Mapping[str, str], labels: Mapping[str, str],
             holder: str, where) -> Iterable[str]:
    for name in sorted(set(old) | set(now)):
        label, file = labels.get(name, ""), where(name)
        if name not in now:
            yield f"{file} ({label}) is missing; {holder} recorded its sha256 at the run's first start"
        elif name not in old:
            yield f"{file} ({label}) is new since the run's first start (its files were {_short(old)})"
        elif old[name] != now[name]:
            yield (f"{file} ({label}) changed since the run's first start (sha256 {old[name][7:19]}... recorded "
                   f"in {holder}, {now[name][7:19]}... now)")


def _short(files: Mapping[str, str]) -> str:
    return ", ".join(Path(f).name for f in sorted(files))


def refuse_child(m: int, model_dir: Path, digests_path: Path, found: str, known: str) -> StateError:
    """The one line for a saved child whose tensors do not match its digest in digests.json."""
    return StateError(
        f"child #{m}'s weights in {model_dir} do not match its digest in {digests_path} ({found[7:19]}... now, "
        f"{known[7:19]}... recorded when it was saved): its files or that digest changed since. Restore them; or "
        f"delete {model_dir} to have it rebuilt from its recipe (checked against the digest); or, if the weights "
        f"are right and the digest is not, delete the entry \"{m}\" from {digests_path.name} to record it again")
