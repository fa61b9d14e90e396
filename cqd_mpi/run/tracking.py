"""Live curves of a run where researchers already look: TensorBoard event files and/or a
Weights & Biases run (the config's `tracking:` section; both optional, imported lazily).

After every checkpoint the conductor calls `Tracker.sync(core)`, which writes every
generation the state has and the tracker has not written yet; step = generation. Per
generation:

    archive/<task>/qd_score, archive/<task>/coverage, archive/<task>/best_quality
    model/<task>                 the model's search-split scores, model/mean their mean
    entered/<task>               1 if it entered that archive, else 0
    time/merge_s, time/transfer_s, time/eval_s, time/total_s
    elite_maps                   an image of the archives, every `maps_every` generations
    progress/generation          written last: the generation is complete

and at the end `final/<model>/<task>` (test split): in TensorBoard at the last generation,
in W&B in the run's summary.

A resumed run continues the same curves with no step written twice: when it opens, the
tracker reads the run's event files back with tensorboard's own loader and skips every
(tag, step) they hold, and writes the generations checkpointed but not yet tracked (a kill
-9 between the checkpoint and the write) from the state, archives replayed where needed.
W&B cannot be read back offline, so its run keeps RUN_DIR/tracking/wandb.json, the last
generation it logged, written before that generation is sent: after a kill -9 a curve may
miss that one generation, but never repeats a step.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cqd_mpi import faults
from cqd_mpi.errors import ConfigError, require
from cqd_mpi.qd.records import ModelKind
from cqd_mpi.run.rundir import RunDir, atomic_write_text

log = logging.getLogger("cqd_mpi.run.tracking")

MARKER = "progress/generation"
TIMINGS = ("merge", "transfer", "eval", "total")


class TensorBoardSink:
    """Scalars and PNG images written with the tensorboard package's event writer."""

    def __init__(self, log_dir: Path):
        require("tensorboard", extra="tracking", feature="tracking.tensorboard")
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        self.log_dir = Path(log_dir)
        self.written = written_steps(self.log_dir)
        self._writer = EventFileWriter(str(self.log_dir))

    def last(self, tag: str) -> int:
        return self.written.get(tag, -1)

    def scalar(self, tag: str, step: int, value: float) -> None:
        if step > self.last(tag):
            value = self._summary.Summary.Value(tag=tag, simple_value=float(value))
            self._add(step, value)
            self.written[tag] = step

    def image(self, tag: str, step: int, png: bytes, width: int, height: int) -> None:
        if step > self.last(tag):
            picture = self._summary.Summary.Image(height=height, width=width, colorspace=4,
                                                  encoded_image_string=png)
            self._add(step, self._summary.Summary.Value(tag=tag, image=picture))
            self.written[tag] = step

    def _add(self, step: int, value) -> None:
        summary = self._summary.Summary(value=[value])
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step), summary=summary))

    def final(self, tag: str, step: int, value: float) -> None:
        self.scalar(tag, step, value)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _writable(directory: Path, *, key: str) -> None:
    """Make `directory` or raise one line naming `key` (a path under a file, in /proc, read-only)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".cqd_mpi-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: expected a directory where event files can be written, got {directory} "
                          f"({exc.strerror or exc})") from exc


def written_steps(log_dir: Path) -> dict[str, int]:
    """The largest step of every tag in the event files of `log_dir` (tensorboard's loader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: dict[str, int] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found[value.tag] = max(found.get(value.tag, -1), int(event.step))
    return found


class WandbSink:
    """A W&B run (offline by default: no network), one per run dir, resumed by its id."""

    def __init__(self, *, rundir: RunDir, project: str, mode: str, name: str, config: Mapping):
        wandb = require("wandb", extra="tracking", feature="tracking.wandb")
        self._wandb = wandb
        self.state_path = rundir.path / "tracking" / "wandb.json"
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.run_id = state.get("run_id") or secrets.token_hex(8)
        self.through = int(state.get("through", -1))
        self._save()
        self.run = wandb.init(project=project, mode=mode, id=self.run_id, resume="allow", name=name,
                              dir=str(rundir.path / "tracking"), config=dict(config),
                              settings=wandb.Settings(console="off"))
        self._pending: dict[str, object] = {}
        self._step = None

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"run_id": self.run_id, "through": self.through}))

    def last(self, tag: str) -> int:
        return self.through

    def _at(self, step: int) -> bool:
        """Whether `step` is still to be logged; a new step sends the previous one first."""
        if step <= self.through:
            return False
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        return True

    def scalar(self, tag: str, step: int, value: float) -> None:
        if self._at(step):
            self._pending[tag] = float(value)

    def image(self, tag: str, step: int, png: bytes, width: int, height: int) -> None:
        if self._at(step):
            from PIL import Image

            self._pending[tag] = self._wandb.Image(Image.open(io.BytesIO(png)))

    def final(self, tag: str, step: int, value: float) -> None:
        """The run's end results go to its summary (a history step must not repeat)."""
        self.run.summary[tag] = float(value)

    def flush(self) -> None:
        if self._pending and self._step is not None:
            self.through = self._step
            self._save()
            self.run.log(self._pending, step=self._step)
        self._pending = {}
        self._step = None

    def close(self) -> None:
        self.flush()
        self.run.finish()


class Tracker:
    """Writes a run's curves to its sinks; see the module docstring for what and when."""

    def __init__(self, sinks: list, *, maps_every: int = 0):
        self.sinks = sinks
        self.maps_every = int(maps_every)

    @classmethod
    def from_config(cls, tracking, rundir: RunDir, *, name: str, config: Mapping) -> Tracker | None:
        """The tracker a `tracking:` section asks for, or None when it asks for nothing."""
        sinks: list = []
        if tracking.tensorboard:
            log_dir = Path(tracking.log_dir) if tracking.log_dir else rundir.path / "tensorboard"
            _writable(log_dir, key="tracking.log_dir")
            sinks.append(TensorBoardSink(log_dir))
        if tracking.wandb:
            sinks.append(WandbSink(rundir=rundir, project=tracking.wandb_project, mode=tracking.wandb_mode,
                                   name=name, config=config))
        return cls(sinks, maps_every=tracking.maps_every) if sinks else None

    def sync(self, core) -> None:
        """Write every generation of `core.history` some sink has not written yet."""
        through = min(sink.last(MARKER) for sink in self.sinks)
        rows = [row for row in core.history if row.generation > through]
        if not rows:
            return
        faults.point("track")
        if len(rows) == 1 and rows[0] is core.history[-1]:
            archives = {rows[0].generation: core.archives}
        else:
            wanted = {row.generation for row in rows}
            archives = {}
            for generation, replayed, _ in core.replay():
                if generation in wanted:
                    archives[generation] = [_copy(a) for a in replayed]
        for row in rows:
            self._generation(core, row, archives[row.generation])
        for sink in self.sinks:
            sink.flush()

    def _generation(self, core, row, archives) -> None:
        t = row.generation
        record = core.models[row.child_id]
        for q, name in enumerate(core.task_names):
            occupied = archives[q].occupant >= 0
            best = float(np.nanmax(archives[q].quality)) if occupied.any() else math.nan
            self._scalar(f"archive/{name}/qd_score", t, row.qd_score[q])
            self._scalar(f"archive/{name}/coverage", t, row.coverage[q])
            self._scalar(f"archive/{name}/best_quality", t, best)
            self._scalar(f"model/{name}", t, record.scores[q])
            self._scalar(f"entered/{name}", t, float(row.entered[q]))
        self._scalar("model/mean", t, float(np.mean(record.scores)))
        for key in TIMINGS:
            self._scalar(f"time/{key}_s", t, getattr(row, f"{key}_s"))
        if self.maps_every and t % self.maps_every == 0:
            png, width, height = elite_maps_png(core.task_names, archives, t)
            for sink in self.sinks:
                sink.image("elite_maps", t, png, width, height)
        self._scalar(MARKER, t, float(t))

    def _scalar(self, tag: str, step: int, value: float) -> None:
        if math.isfinite(float(value)):
            for sink in self.sinks:
                sink.scalar(tag, step, value)

    def final(self, core) -> None:
        """The test-split scores of the models a run ends with, at its last generation."""
        step = core.generations_done
        kinds = [r.kind for r in core.models]
        named = [("base", core.base_id)] + [(f"expert_{n}", e) for n, e in zip(core.task_names, core.expert_ids)]
        for kind in (ModelKind.AVERAGE, ModelKind.AGGREGATE):
            if kind in kinds:
                named.append((kind, len(kinds) - 1 - kinds[::-1].index(kind)))
        for label, m in named:
            scores = core.models[m].test_scores
            values = {f"final/{label}/{name}": value for name, value in zip(core.task_names, scores)}
            if np.all(np.isfinite(scores)):
                values[f"final/{label}/mean"] = float(np.mean(scores))
            for tag, value in values.items():
                if math.isfinite(float(value)):
                    for sink in self.sinks:
                        sink.final(tag, step, value)
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _copy(archive):
    from cqd_mpi.qd.archive import Archive

    copy = Archive(quality_task=archive.quality_task, bc_tasks=archive.bc_tasks, bins=archive.bins)
    copy.occupant[...] = archive.occupant
    copy.quality[...] = archive.quality
    return copy


def elite_maps_png(task_names, archives, generation: int) -> tuple[bytes, int, int]:
    """One panel per archive: quality by cell over its first two behaviour axes (the best
    over any further axes), as PNG bytes with their width and height."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archives), figsize=(3.2 * len(archives), 3.0), squeeze=False)
    for ax, archive in zip(axes[0], archives):
        quality = archive.quality
        if quality.ndim == 1:
            quality = quality[:, None]
        elif quality.ndim > 2:
            filled = np.where(np.isnan(quality), -np.inf, quality).max(axis=tuple(range(2, quality.ndim)))
            quality = np.where(np.isneginf(filled), np.nan, filled)
        image = ax.imshow(quality.T, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        bc = [task_names[t] for t in archive.bc_tasks]
        ax.set_title(f"{task_names[archive.quality_task]} archive", fontsize=9)
        ax.set_xlabel(bc[0] if bc else "", fontsize=8)
        ax.set_ylabel(bc[1] if len(bc) > 1 else "", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"elite maps, generation {generation}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    png = buffer.getvalue()
    return png, int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
