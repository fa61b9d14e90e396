"""The task's side of the sandboxed evalplus harness (cqd_mpi/sandboxes/evalplus_harness.py): what
a run reports (`RunRecord`, read from its event lines with an error class) and the judge's verdicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "sandboxes" / "evalplus_harness.py"


VERDICTS = ("pass", "fail", "timeout")
"""evalplus's statuses (evalplus.eval.PASS, FAIL, TIMEOUT)."""

JUDGE_ERRORS = {"pass": None, "fail": "wrong-answer", "timeout": "timeout"}

JUDGE_ITEM_SECONDS = 3.0
"""What evalplus's untrusted_check adds to an item's time limits: its join slack and the child's start."""

CHECK_SLACK_SECONDS = 3.0
"""What evalplus adds to one check's time limits, the same in the pinned commit and 0.3.1: 1 s,
1 more without fast_check (evaluate's default), 1 more in the join (eval/__init__.py:197-199,224
at 1895d2f6; 236-238,263 in 0.3.1). Only the cap differs: 0.3.1 takes min(60, the sum) first."""


@dataclasses.dataclass(frozen=True)
class Groundtruth:
    outputs: list
    seconds: list[float]


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the run-mode harness reported for one solution; `outputs` are its result lines,
    undecoded (only the judge's sandbox builds values from them)."""

    error: str | None
    outputs: list[str]
    seconds: float
    message: str = ""
    stderr: str = ""


_SIGNAL_ERRORS = {"SIGXCPU": "timeout", "SIGKILL": "crash", "SIGSEGV": "crash", "SIGABRT": "crash"}


def _read_run(result, *, expected_count: int) -> RunRecord:
    """Turn the harness's event lines and the sandbox's exit into a RunRecord with an error class.

    Work here is linear in the output, which the sandbox caps: lines are parsed as JSON (flat
    types only, string keys) and output values are kept as text for the judge."""
    stderr = result.stderr.decode(errors="replace")[-500:]

    def record(error, message="", outputs=()):
        return RunRecord(error=error, outputs=list(outputs), seconds=result.seconds, message=message, stderr=stderr)

    if not result.started:
        return record("sandbox", "the sandbox did not start")
    if result.output_exceeded:
        return record("output-limit", "the program wrote more than the output cap")
    if result.timed_out:
        return record("timeout", "the wall-clock limit was reached")
    outputs = []
    for line in result.stdout.decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return record("crash", "the result stream is malformed")
        message = str(event.get("message", ""))[:300]
        exc_type = str(event.get("type", ""))
        if kind == "syntax":
            return record("syntax", f"{exc_type}: {message}")
        if kind == "no-entry-point":
            return record("no-entry-point", f"the solution defines no function {event.get('name')!r}")
        if kind in ("load-error", "raised"):
            error = "memory" if exc_type == "MemoryError" else "runtime"
            return record(error, f"{exc_type}: {message}", outputs)
        if kind == "timeout":
            return record("timeout", f"input {event.get('index')} ran past its time limit", outputs)
        if kind == "unencodable":
            return record("wrong-answer", f"output {event.get('index')} is not a plain value: {message}", outputs)
        if kind == "output":
            if event.get("index") != len(outputs) or "value" not in event:
                return record("crash", "the result stream is out of order")
            outputs.append(line)
        if kind == "done":
            if len(outputs) != expected_count:
                return record("crash", f"{len(outputs)} outputs for {expected_count} inputs")
            return record(None, "", outputs)
    signal_name = result.killed_by.name if result.killed_by else None
    error = _SIGNAL_ERRORS.get(signal_name or "", "crash")
    how = f"killed by {signal_name}" if signal_name else f"exited with status {result.returncode}"
    return record(error, f"the program {how} before finishing its tests", outputs)
