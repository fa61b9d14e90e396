"""Runs inside the sandbox: execute one solution on its test inputs, or judge recorded outputs with evalplus.

Mode ``run`` (untrusted code): under evalplus's reliability guard, I/O swallowing and per-input
time limits, exec the solution, call its entry point on each input and stream every output,
exception or timeout as a JSON line on the result channel (the original stdout; fd 1 is
pointed at stderr before the solution runs). Expected outputs never enter this process, so
no trick inside it (patching the checker, custom ``__eq__``, forged lines) can fake a pass.

Mode ``judge`` (trusted replay): evalplus's own ``untrusted_check`` scores each item against
the expected outputs, with a stand-in entry point that returns the recorded outputs in order.
Its verdicts therefore include evalplus's special oracles, float tolerance and set equality.
The recorded outputs arrive as the run's own result lines, still encoded: the stand-in decodes
each one inside evalplus's per-item child process, under its time limit, so an output that is
costly to build (a set of integers with equal hashes) costs its own item a timeout and nothing
else, and the host never builds a value from sandbox output.

Both read a pickled request on stdin (written by the host). Values cross the boundary as
tagged JSON (`encode_value` / `decode_value`), which decodes only to plain Python types.
Stdlib only at import time; evalplus is imported inside the modes.
"""

from __future__ import annotations

import json
import numbers
import os
import pickle
import sys
import types

MAX_DEPTH = 64
_MESSAGE_CHARS = 300


class CodecError(ValueError):
    """A value cannot cross the sandbox boundary."""


def encode_value(value, depth: int = 0):
    """Plain JSON for scalars and strings; {"t": tag, "v": ...} for containers, complex and bytes."""
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return encode_value(value.item(), depth + 1)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, complex):
        return {"t": "complex", "v": [complex.__complex__(value).real, complex.__complex__(value).imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"t": "bytes", "v": bytes(value).hex()}
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [encode_value(v, depth + 1) for v in tuple.__iter__(value)]}
    if isinstance(value, list):
        return {"t": "list", "v": [encode_value(v, depth + 1) for v in list.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"t": "frozenset", "v": [encode_value(v, depth + 1) for v in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"t": "set", "v": [encode_value(v, depth + 1) for v in set.__iter__(value)]}
    if isinstance(value, dict):
        pairs = [[encode_value(k, depth + 1), encode_value(dict.__getitem__(value, k), depth + 1)]
                 for k in dict.__iter__(value)]
        return {"t": "dict", "v": pairs}
    raise CodecError(f"cannot send a value of type {kind.__name__} out of the sandbox")


def decode_value(data, depth: int = 0):
    """The inverse of encode_value; builds only None, bool, int, float, complex, str, bytes and containers."""
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not isinstance(data, dict) or set(data) != {"t", "v"}:
        raise CodecError(f"malformed value {str(data)[:80]!r}")
    tag, body = data["t"], data["v"]
    if tag == "complex" and isinstance(body, list) and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "bytes" and isinstance(body, str):
        return bytes.fromhex(body)
    if not isinstance(body, list):
        raise CodecError(f"malformed {tag!r} value")
    if tag == "dict":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
            raise CodecError("malformed dict value")
        return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in body}
    items = [decode_value(v, depth + 1) for v in body]
    containers = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    if tag not in containers:
        raise CodecError(f"unknown value tag {tag!r}")
    return containers[tag](items)


def _describe(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)[:_MESSAGE_CHARS]}


class _Channel:
    """The result stream: the original stdout, one JSON object per line, flushed at once."""

    def __init__(self):
        self.fd = os.dup(1)
        os.dup2(2, 1)

    def send(self, **event):
        line = (json.dumps(event, allow_nan=True) + "\n").encode()
        view = memoryview(line)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


def run_solution(request: dict, channel: _Channel) -> None:
    """Execute untrusted `code` and stream its outputs; see the module docstring."""
    from evalplus.eval.utils import TimeoutException, reliability_guard, swallow_io, time_limit

    code, entry_point = request["code"], request["entry_point"]
    inputs, limits = request["inputs"], request["time_limits"]
    try:
        compiled = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        channel.send(event="syntax", **_describe(exc))
        return
    channel.send(event="compiled")
    reliability_guard(maximum_memory_bytes=None)
    namespace: dict = {}
    try:
        with swallow_io():
            exec(compiled, namespace)
    except BaseException as exc:
        channel.send(event="load-error", **_describe(exc))
        return
    function = namespace.get(entry_point)
    if not callable(function):
        channel.send(event="no-entry-point", name=entry_point)
        return
    channel.send(event="loaded")
    for index, args in enumerate(inputs):
        try:
            with time_limit(limits[index]), swallow_io():
                output = function(*args)
        except TimeoutException:
            channel.send(event="timeout", index=index)
            return
        except BaseException as exc:
            channel.send(event="raised", index=index, **_describe(exc))
            return
        try:
            encoded = encode_value(output)
        except (CodecError, RecursionError, TypeError, ValueError, OverflowError) as exc:
            channel.send(event="unencodable", index=index, **_describe(exc))
            return
        channel.send(event="output", index=index, value=encoded)
    channel.send(event="done")


def recorded_output(line: str):
    """The value of one ``output`` result line of a run, decoded."""
    event = json.loads(line)
    if not isinstance(event, dict) or "value" not in event:
        raise CodecError("an output line without a value")
    return decode_value(event["value"])


def _replay_code(entry_point: str) -> str:
    return (
        "import cqd_replay as _replay\n"
        "_outputs = iter(_replay.outputs)\n"
        f"def {entry_point}(*args):\n"
        "    return _replay.recorded_output(next(_outputs))\n"
    )


PINNED = "evalplus-1895d2f6"
"""The comparison rules of the evalplus commit SakanaAI/CycleQD pins (evaluation/fishfarm/
pyproject.toml:57), written from evalplus/eval/__init__.py:90-99,137-166 and
eval/_special_oracle.py:6 at that commit; evalplus 0.3.1 (the `reference` judge) added set
equality for eight problems, oracles for Mbpp/558 and 581, a type and length check before the
float comparison, and a bool rule for the not-None problems."""

PINNED_NOT_NONE = ("check_str", "text_match_three", "text_starta_endb")
"""Problems whose output only has to be None or not (_special_oracle.py:6 at 1895d2f6)."""


def pinned_floats(value) -> bool:
    """1895d2f6's is_floats (__init__.py:90-99): a float, or a list or tuple of floats; an empty
    list or tuple counts (0.3.1 requires a non-empty one)."""
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, float) for v in value)
    return False


def pinned_check(out, expected, entry_point: str, atol: float, *, dataset: str = "mbpp",
                 inp=()) -> tuple[bool, float]:
    """One output judged by 1895d2f6's rules: (passed, the atol later inputs of the item use, since
    the commit's loop keeps the atol it raised to 1e-6 for float outputs).

    Equality first; Mbpp/164 always passes, Mbpp/295 passes on 0, the not-None problems compare
    `expected` with `out is not None` (a bool output included); then, when not equal and atol is
    not 0, numpy's assert_allclose (rtol 1e-7, NaN equal to NaN, shapes must agree, no type
    check: a tuple may stand for a list). The oracles by entry point are MBPP+'s; HumanEval+
    has one, HumanEval/32's find_zero: |poly(xs, out)| <= atol (evalplus 0.3.1's eval/__init__.py:186-189)."""
    import numpy as np

    if dataset == "humaneval" and entry_point == "find_zero":
        from evalplus.eval._special_oracle import _poly

        return bool(abs(_poly(*inp, out)) <= atol), atol
    exact = out == expected
    if dataset != "mbpp":
        pass
    elif entry_point == "are_equivalent":
        exact = True
    elif entry_point == "sum_div":
        exact = exact or out == 0
    elif entry_point in PINNED_NOT_NONE:
        exact = expected == (out is not None)
    if atol == 0 and pinned_floats(expected):
        atol = 1e-6
    if not exact and atol != 0:
        try:
            np.testing.assert_allclose(out, expected, atol=atol)
        except (AssertionError, TypeError, ValueError):
            return False, atol
        return True, atol
    return bool(exact), atol


def _pinned_item(item: dict, judge_seconds: float, verdict) -> None:
    """In a child process: every output of one item, each decoded and judged within judge_seconds
    (verdict 1: pass; 2: an output took longer, a timeout as in the 0.3.1 judge; 0: fail)."""
    from evalplus.eval.utils import TimeoutException, time_limit

    atol = item["atol"]
    try:
        for line, expected, inp in zip(item["outputs"], item["expected"], item["inputs"], strict=True):
            with time_limit(judge_seconds):
                passed, atol = pinned_check(recorded_output(line), expected, item["entry_point"], atol,
                                            dataset=item.get("dataset", "mbpp"), inp=inp)
            if not passed:
                return
        verdict.value = 1
    except TimeoutException:
        verdict.value = 2
    except BaseException:
        return


def judge_pinned(request: dict, channel: _Channel) -> None:
    """Score recorded outputs by 1895d2f6's rules, each item in its own child process (as that
    commit's untrusted_check runs it), killed past its outputs' judge_seconds plus one second."""
    import multiprocessing

    for item in request["items"]:
        item = {**item, "dataset": request.get("dataset", "mbpp")}
        verdict = multiprocessing.Value("i", 0)
        child = multiprocessing.Process(target=_pinned_item, args=(item, request["judge_seconds"], verdict))
        child.start()
        child.join(timeout=len(item["outputs"]) * request["judge_seconds"] + 1)
        status = {1: "pass", 2: "timeout"}.get(verdict.value, "fail")
        if child.is_alive():
            child.kill()
            child.join()
            status = "timeout"
        channel.send(index=int(item["index"]), status=status, details=[])


def judge(request: dict, channel: _Channel) -> None:
    """Score recorded outputs with evalplus's untrusted_check, one verdict line per item.

    Each output may take `judge_seconds` to decode and compare (evalplus's per-input limit,
    inside its per-item child process, which it kills past the item's total)."""
    if request.get("rules") == PINNED:
        judge_pinned(request, channel)
        return
    from evalplus.eval import untrusted_check

    replay = types.ModuleType("cqd_replay")
    replay.recorded_output = recorded_output
    sys.modules["cqd_replay"] = replay
    for item in request["items"]:
        replay.outputs = item["outputs"]
        status, details = untrusted_check(
            request.get("dataset", "mbpp"),
            _replay_code(item["entry_point"]),
            item["inputs"],
            item["entry_point"],
            expected=item["expected"],
            atol=item["atol"],
            ref_time=[0.0] * len(item["inputs"]),
            fast_check=True,
            min_time_limit=request["judge_seconds"],
            gt_time_limit_factor=1.0,
        )
        channel.send(index=int(item["index"]), status=status, details=[bool(d) for d in details])


def main() -> None:
    channel = _Channel()
    request = pickle.loads(sys.stdin.buffer.read())
    if request["mode"] == "run":
        run_solution(request, channel)
    elif request["mode"] == "judge":
        judge(request, channel)
    else:
        channel.send(event="bad-request", message=f"unknown mode {request['mode']!r}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
