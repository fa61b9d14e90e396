"""MPI shared-memory segments that outlive their job: recorded per node, removed at the next start.

MPICH (the pip `mpich` wheel) keeps a few-MB `/dev/shm/mpich_shm_*` segment per node for as
long as a job runs and unlinks it at MPI_Finalize; a job ended by MPI_Abort or kill -9 leaves
it behind, and on a shared node they pile up. So every rank records the segments it maps
(/proc/self/maps) in a file of its own in the node's registry (REGISTRY_VARIABLE, default
/dev/shm/cqd_mpi-<uid>), next to what it tracks and gone with it at reboot. At start, every
rank removes the recorded segments whose recording processes are all dead and that no live
process maps; an aborting rank unlinks its job's segments at once (`release`). A segment
of another live job is never touched: its recorders are alive, or it is mapped, or it was
never recorded.

MPICH names a job's segment after its PMI key-value space, which under SLURM is
"<job id>.<step id>": a requeued job's steps get the names of its earlier start's, and so does
a new job once the controller's job ids start again. MPICH opens an existing segment of its
name as one that a faster rank of its node made, so a stale one (the earlier start's ranks
were killed) is mapped instead of a fresh one: MPI_Init then fails, or the node's ranks read
the dead job's bytes. The sweep above runs after MPI_Init, too late for that; `clear_job`
removes, on each node of a job before its ranks start (jobs/lib.sh), the segments named after
that job's steps that no live process maps. Run as `python -m cqd_mpi.runtime.shm clear-job
JOB_ID`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("cqd_mpi.shm")

SHM_DIR = Path("/dev/shm")
PREFIX = "mpich_"
REGISTRY_VARIABLE = "CQD_MPI_SHM_REGISTRY"


def registry() -> Path:
    """This node's registry of segments, one file per recording process."""
    return Path(os.environ.get(REGISTRY_VARIABLE) or SHM_DIR / f"cqd_mpi-{os.getuid()}")


def mapped_segments(pid: int | str = "self") -> set[str]:
    """Names of the MPI segments under /dev/shm that process `pid` maps and are still linked."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    found = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith(f"{SHM_DIR}/{PREFIX}") and not path.endswith("(deleted)"):
            found.add(Path(path).name)
    return found


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def record() -> None:
    """Write (or rewrite) this process's record: its pid, start time and mapped segments."""
    segments = mapped_segments()
    if not segments:
        return
    folder = registry()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "start": start_time(os.getpid()),
                                   "segments": sorted(segments)}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record this job's shared-memory segments in %s: %s", folder, exc)


def forget() -> None:
    """Drop this process's record (its job is ending well: MPI_Finalize unlinks the segments)."""
    (registry() / f"{os.getpid()}.json").unlink(missing_ok=True)


def _unlink(names: Iterable[str]) -> list[str]:
    removed = []
    for name in names:
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", SHM_DIR / name, exc)
    return removed


def release() -> None:
    """Unlink the segments this process maps (its job is being aborted: nobody opens them again)."""
    _unlink(mapped_segments())


def live_mappings() -> set[str]:
    """Segments mapped by any process this user can see."""
    found: set[str] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found |= mapped_segments(entry.name)
    return found


def sweep() -> list[str]:
    """Remove the recorded segments whose recorders are all dead and that no live process maps,
    then the records that have nothing left to watch. Returns the names removed."""
    folder = registry()
    if not folder.is_dir():
        return []
    live: set[str] = set()
    dead: dict[Path, set[str]] = {}
    for path in folder.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            pid, started, segments = int(entry["pid"]), entry["start"], set(entry["segments"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if started is not None and start_time(pid) == started:
            live |= segments
        else:
            dead[path] = segments
    candidates = {s for segments in dead.values() for s in segments if (SHM_DIR / s).exists()} - live
    kept = live_mappings() & candidates if candidates else set()
    removed = _unlink(candidates - kept)
    for path, segments in dead.items():
        if not segments & kept:
            path.unlink(missing_ok=True)
    if removed:
        log.info("removed %d shared-memory segment(s) left by ended jobs: %s", len(removed), ", ".join(removed))
    return removed


# MPICH 5 (ch4/shm/posix): "/mpich_shm_%x_%d" and "/mpich_vci_%x_%d" of the FNV-1a hash of the
# PMI kvs name and the node's index; newer MPICH hashes "<kvs name>-<init count>".
_SEGMENT_KINDS = ("shm", "vci")
# Steps of one start whose names are cleared: jobs/lib.sh's starts use two (this and the run).
_STEPS_PER_START = 16


def _fnv1a(text: str) -> int:
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def job_segment_prefixes(job_id: str) -> set[str]:
    """Name prefixes (up to the node index) of the segments MPICH makes for steps of SLURM job
    `job_id` (steps 0 to _STEPS_PER_START - 1)."""
    prefixes = set()
    for step in range(_STEPS_PER_START):
        for kvs in (f"{job_id}.{step}", f"{job_id}.{step}-1"):
            prefixes |= {f"{PREFIX}{kind}_{_fnv1a(kvs):x}_" for kind in _SEGMENT_KINDS}
    return prefixes


def clear_job(job_id: str) -> list[str]:
    """Remove this node's segments named after steps of `job_id` that no live process maps
    (an earlier start's, killed): the job's ranks, started next, would open them as their own."""
    prefixes = job_segment_prefixes(job_id)
    try:
        named = {p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX)
                 and p.name.rsplit("_", 1)[0] + "_" in prefixes}
    except OSError:
        return []
    return _unlink(named - live_mappings()) if named else []


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "clear-job" or not argv[1].isdigit():
        print(f"usage: python -m cqd_mpi.runtime.shm clear-job JOB_ID (got: {' '.join(argv) or 'nothing'})",
              file=sys.stderr)
        return 2
    removed = clear_job(argv[1])
    if removed:
        print(f"cqd_mpi: {socket.gethostname()}: removed {len(removed)} shared-memory segment(s) left by "
              f"ended jobs: {', '.join(sorted(removed))} (named after job {argv[1]}'s steps, which its "
              "ranks would have opened as their own)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
