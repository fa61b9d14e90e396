"""The run directory: frozen config, checkpoint, saved archive members, final model, plots, logs.

    RUN_DIR/config.yaml     frozen config; a resume with a config that would change results is refused
    RUN_DIR/state.h5        the checkpoint (state.h5.bak: the previous one)
    RUN_DIR/models/<id>/    archive members as Hugging Face dirs (with runtime.model_store_bytes,
                            some kept as recipes only: run/store.py)
    RUN_DIR/digests.json    the tensors' digest of every child saved, to check rebuilt ones
    RUN_DIR/final/          the aggregated model (HF dir) and report.json
    RUN_DIR/plots/          PNGs from `analyze`
    RUN_DIR/logs/           per-rank logs
    RUN_DIR/staging/        children written for transport `file` (unless runtime.staging_dir)
    RUN_DIR/work/           the tasks' scratch space, per rank

This module is the one place that knows these names; run/keeping.py decides which models
are kept there (state.h5's `saved` and `path` columns).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from cqd_mpi.errors import StateError
from cqd_mpi.qd.records import ModelKind, ModelRecord
from cqd_mpi.run import config as config_mod
from cqd_mpi.run import frozen

log = logging.getLogger("cqd_mpi.run.rundir")

MODELS = "models"
FINAL = "final"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    state_path = property(lambda self: self.path / "state.h5")
    models_dir = property(lambda self: self.path / MODELS)
    final_dir = property(lambda self: self.path / FINAL)
    plots_dir = property(lambda self: self.path / "plots")
    logs_dir = property(lambda self: self.path / "logs")
    backup_path = property(lambda self: self.path / "state.h5.bak")
    work_dir = property(lambda self: self.path / "work")
    digests_path = property(lambda self: self.path / "digests.json")

    def staging_dir(self, configured: str | os.PathLike | None = None) -> Path:
        """Where transport `file` writes children: `runtime.staging_dir`, else RUN_DIR/staging."""
        return Path(configured) if configured else self.path / "staging"

    def has_state(self) -> bool:
        return self.state_path.exists() or self.backup_path.exists()

    def prepare(self, config: config_mod.Config, *, force: bool = False) -> None:
        """Create the directory and check the config against the frozen one (`freeze` writes it
        once the state has been checked too)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in (self.models_dir, self.logs_dir):
            sub.mkdir(exist_ok=True)
        if self.config_path.exists():
            old = frozen.upgrade(yaml.safe_load(self.config_path.read_text()))
            frozen.refuse_changes(str(self.path), frozen.differences(old, config.to_dict()), force=force)

    def freeze(self, config: config_mod.Config) -> None:
        atomic_write_text(self.config_path, config.to_yaml())

    def lock(self):
        """Hold an exclusive lock on the run dir so that two jobs never write the same state."""
        handle = open(self.path / ".lock", "w")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateError(f"{self.path} is in use by another cqd_mpi process (lock file {self.path / '.lock'})") from None
        except OSError as exc:
            log.warning("cannot lock %s (%s); make sure no other job uses this run dir", self.path, exc)
        return handle

    def resolve(self, path: str) -> Path:
        """Model paths in the state are absolute (experts, base) or relative to the run dir."""
        p = Path(path)
        return p if p.is_absolute() else self.path / p

    def model_dir(self, model_id: int) -> Path:
        """Where a child that enters an archive is written."""
        return self.models_dir / str(model_id)

    def weights_of(self, record: ModelRecord) -> Path:
        """The directory a model's weights are kept in (run/keeping.py): the user's for the base
        and the experts, models/<id> for a child, final/ for the final model."""
        if record.kind in (ModelKind.BASE, ModelKind.EXPERT):
            return self.resolve(record.source)
        if record.kind == ModelKind.CHILD:
            return self.model_dir(record.id)
        if record.kind == ModelKind.AGGREGATE:
            return self.final_dir
        raise StateError(f"model {record.id} ({record.kind}) has no weights in the run")

    def sweep(self, keep: set[int]) -> list[int]:
        """Delete model dirs other than those of `keep` (the children the run needs), and unfinished temp dirs."""
        removed = []
        if not self.models_dir.exists():
            return removed
        for entry in self.models_dir.iterdir():
            if entry.name.isdigit() and int(entry.name) in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if entry.name.isdigit():
                removed.append(int(entry.name))
        return sorted(removed)

    def write_json(self, path: Path, obj: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
