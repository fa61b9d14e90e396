"""The run directory: frozen config, checkpoint, saved archive members, final model, plots, logs.

    RUN_DIR/config.yaml     frozen config; a resume with a config that would change results is refused
    RUN_DIR/state.h5        the checkpoint (state.h5.bak: the previous one)
    RUN_DIR/models/<id>/    archive members as Hugging Face dirs
    RUN_DIR/final/          the aggregated model (HF dir) and report.json
    RUN_DIR/plots/          PNGs from `analyze`
    RUN_DIR/logs/           per-rank logs
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
from cqd_mpi.run import config as config_mod
from cqd_mpi.run.state import HDF5Backend

log = logging.getLogger("cqd_mpi.run.rundir")


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
    models_dir = property(lambda self: self.path / "models")
    final_dir = property(lambda self: self.path / "final")
    plots_dir = property(lambda self: self.path / "plots")
    logs_dir = property(lambda self: self.path / "logs")

    def backend(self, *, keep_backup: bool = True) -> HDF5Backend:
        return HDF5Backend(self.state_path, keep_backup=keep_backup)

    def has_state(self) -> bool:
        return self.state_path.exists() or self.state_path.with_name("state.h5.bak").exists()

    def prepare(self, config: config_mod.Config, *, force: bool = False) -> None:
        """Create the directory and freeze the config, or check it against the frozen one."""
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in (self.models_dir, self.logs_dir):
            sub.mkdir(exist_ok=True)
        new = config.to_dict()
        if self.config_path.exists():
            old = config_mod.upgrade(yaml.safe_load(self.config_path.read_text()))
            changed = config_mod.differences(old, new)
            if changed and not force:
                listing = "\n  ".join(changed)
                raise StateError(
                    f"{self.path} holds a run with a different config; resuming it with this one would "
                    f"change its results:\n  {listing}\nUse the original config, a new run_dir, or "
                    "--force to resume with the new settings anyway."
                )
            if changed:
                log.warning("resuming %s with a changed config (--force): %s", self.path, "; ".join(changed))
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
        return self.models_dir / str(model_id)

    def sweep(self, saved_ids: set[int]) -> list[int]:
        """Delete model dirs that the state does not mark as saved, and unfinished temp dirs."""
        removed = []
        if not self.models_dir.exists():
            return removed
        for entry in self.models_dir.iterdir():
            if entry.name.isdigit() and int(entry.name) in saved_ids:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if entry.name.isdigit():
                removed.append(int(entry.name))
        return sorted(removed)

    def write_json(self, path: Path, obj: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
