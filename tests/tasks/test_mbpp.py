"""MBPP+: evalplus data, prompts and extraction, sandboxed scoring that no hostile completion can fool."""

import gzip
import json
import os
import resource
import shutil
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import cqd_mpi
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks import protocols, task_class
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.mbpp import (
    CHAT_STOP,
    INSTRUCTION_PREFIX,
    RESPONSE_PREFIX,
    SYSTEM_MESSAGE,
    MbppPlusTask,
    default_data_path,
)
from tests.tasks.helpers import MBPP_FIXTURE as FIXTURE
from tests.tasks.helpers import ScriptedModel, canonical, make_task

FIXTURE_IDS = ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/6", "Mbpp/8", "Mbpp/17", "Mbpp/82", "Mbpp/124"]
REPO = Path(cqd_mpi.__file__).resolve().parents[1]
KINDS = [pytest.param(kind, marks=pytest.mark.skipif(shutil.which(kind) is None, reason=f"{kind} is not installed"))
         for kind in ("bwrap", "unshare")]
ERROR_CLASSES = {"syntax", "no-entry-point", "runtime", "memory", "timeout", "crash", "output-limit",
                 "wrong-answer", "sandbox"}


# ----------------------------------------------------------------------------- data


def test_registered_as_the_mbpp_kind():
    assert task_class("mbpp") is MbppPlusTask


def test_item_ids_follow_the_file_and_the_subset():
    assert make_task().item_ids() == FIXTURE_IDS
    assert make_task(task_ids=["Mbpp/82", "Mbpp/2"]).item_ids() == ["Mbpp/2", "Mbpp/82"]


def test_inputs_are_deserialized_as_evalplus_does():
    problems = make_task().problems
    assert problems["Mbpp/2"]["base_input"][0] == [(3, 4, 5, 6), (5, 7, 4, 10)]
    assert problems["Mbpp/124"]["base_input"][0] == (0.0, 1j)


def test_relative_data_path_resolves_against_the_config_dir(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "mbpp.jsonl")
    task = make_task("mbpp.jsonl", context=TaskContext(config_dir=tmp_path))
    assert task.data_path() == tmp_path / "mbpp.jsonl"
    assert task.item_ids() == FIXTURE_IDS


def test_mbpp_override_path_is_honoured(monkeypatch):
    monkeypatch.setenv("MBPP_OVERRIDE_PATH", str(FIXTURE))
    assert make_task(None).item_ids() == FIXTURE_IDS


def test_default_path_is_evalplus_release_cache(monkeypatch):
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    path, url = default_data_path()
    assert path.name == "MbppPlus-v0.2.0.jsonl"
    assert url.endswith("/v0.2.0/MbppPlus.jsonl.gz")


def test_missing_data_names_the_file_and_how_to_get_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(TaskError, match=rf"{missing} does not exist; nothing is downloaded.*get_mbpp_plus"):
        make_task(missing).item_ids()
    monkeypatch.setenv("MBPP_OVERRIDE_PATH", str(missing))
    with pytest.raises(TaskError, match=rf"MBPP\+ data file {missing} does not exist"):
        make_task(None).item_ids()


def test_bad_data_files_are_task_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(TaskError, match=rf"{broken} line 1: not valid JSON \(Expecting property name"):
        make_task(broken).item_ids()
    lines = FIXTURE.read_text().splitlines()
    broken.write_text("\n".join([lines[0], "", lines[1][:-1], *lines[2:]]) + "\n")
    with pytest.raises(TaskError, match=rf"{broken} line 3: not valid JSON \(Expecting ',' delimiter at column"):
        make_task(broken).item_ids()
    packed = tmp_path / "broken.jsonl.gz"
    packed.write_bytes(gzip.compress(("\n".join([*lines[:4], "[1, 2]"]) + "\n").encode()))
    with pytest.raises(TaskError, match=rf"{packed} line 5: expected a JSON object with a string 'task_id'"):
        make_task(packed).item_ids()
    packed.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    assert make_task(packed).item_ids() == FIXTURE_IDS
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    del rows[1]["contract"]
    incomplete = tmp_path / "incomplete.jsonl"
    incomplete.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"contract not found in MBPP\+ #Mbpp/3"):
        make_task(incomplete).item_ids()
    rows[1]["contract"], rows[2]["entry_point"] = "", "not valid"
    incomplete.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"'Mbpp/4' has entry_point 'not valid', expected a Python identifier"):
        make_task(incomplete).item_ids()


def test_unknown_task_ids_are_named():
    with pytest.raises(TaskError, match=r"task_ids names 'Mbpp/999', which .* does not hold"):
        make_task(task_ids=["Mbpp/2", "Mbpp/999"]).item_ids()


def test_settings_are_checked_key_by_key():
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.settings: unknown key 'temperature'"):
        make_task(temperature=0.2)
    with pytest.raises(ConfigError, match=r"settings\.prompt_format: expected one of 'instruction-response'"):
        make_task(prompt_format="alpaca")
    with pytest.raises(ConfigError, match=r"settings\.memory_mb: expected at least 64"):
        make_task(memory_mb=32)
    with pytest.raises(ConfigError, match=r"settings\.timeout_seconds: expected a number > 0"):
        make_task(timeout_seconds=0)


# ------------------------------------------------------------------ prompts and code


def test_each_point_of_the_prompt_is_its_own_setting():
    """The evalplus instruction in the authors' format (the mixture the task used to call the
    authors'): every piece can be chosen alone."""
    task = make_task(instruction="evalplus", response_prefix=f"\n{RESPONSE_PREFIX}\n```python\n")
    prompt = task.problems["Mbpp/17"]["prompt"].strip()
    assert task.prompt_text("Mbpp/17") == (
        f"{SYSTEM_MESSAGE}\n\n@@ Instruction:\n{INSTRUCTION_PREFIX}\n```\n{prompt}\n```\n\n"
        f"@@ Response:\n{RESPONSE_PREFIX}\n```python\n"
    )
    bare = make_task(system_message=None, response_prefix="")
    assert bare.prompt_text("Mbpp/17").startswith("@@ Instruction:\nWrite a function that returns the perimeter")
    assert bare.prompt_text("Mbpp/17").endswith("```\n\n@@ Response:")
    assert [t["role"] for t in bare.conversation("Mbpp/17")] == ["user"]


def test_chat_and_completion_prompts():
    chat = make_task(protocol="reference")
    turns = chat.conversation("Mbpp/3")
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[1]["content"] == f"{RESPONSE_PREFIX}\n```python\n"
    assert set(CHAT_STOP) <= set(chat.stop_strings())
    completion = make_task(protocol="reference", prompt_format="completion", stop=None)
    assert completion.prompt_text("Mbpp/3") == completion.problems["Mbpp/3"]["prompt"].strip() + "\n"
    assert {"\nassert", '\n"""'} <= set(completion.stop_strings())
    assert "\n```\n" not in completion.stop_strings()
    assert make_task(stop=None).stop_strings() == [*protocols.EVALPLUS_EOS, *CHAT_STOP]
    with pytest.raises(ConfigError, match=r"settings\.stop: expected non-empty strings or null"):
        make_task(stop=["", "x"])


def test_prompts_the_authors_instruction_cannot_be_cut_from_are_task_errors(tmp_path):
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    rows[0]["prompt"] = "Write a function without a docstring."
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"the prompt of 'Mbpp/2' cannot be cut into the authors' instruction.*no docstring"):
        make_task(odd).prompt_text("Mbpp/2")
    assert make_task(odd, protocol="reference").conversation("Mbpp/2")[0]["content"].endswith(
        "```\nWrite a function without a docstring.\n```\n")


def test_solution_extraction_keeps_the_entry_point_and_its_dependencies():
    task = make_task(sanitizer="evalplus")
    reply = textwrap.dedent(
        """\
        import math
        def helper(x):
            return x * 4
        def square_perimeter(a):
            return helper(a)
        def unused():
            return 0
        print(square_perimeter(3))
        ```
        This function multiplies by four.
        """
    )
    code = task.solution("Mbpp/17", reply)
    assert code == "import math\ndef helper(x):\n    return x * 4\ndef square_perimeter(a):\n    return helper(a)"
    completion = make_task(protocol="reference", prompt_format="completion")
    assert "def square_perimeter(a):\n  return 4*a" in completion.solution("Mbpp/17", "def square_perimeter(a):\n  return 4*a\n")


# ------------------------------------------------------------------- scoring


@pytest.mark.parametrize("kind", KINDS)
def test_reference_solutions_score_100_percent(kind):
    task = make_task(sandbox=kind)
    results = task.reference_results(task.item_ids())
    assert [r.item_id for r in results] == FIXTURE_IDS
    assert [(r.score, r.error) for r in results] == [(1.0, None)] * len(FIXTURE_IDS)
    assert task.metric(results) == 1.0
    assert all(r.detail["status"] == "pass" and r.seconds > 0 for r in results)


@pytest.mark.parametrize("protocol, set_equal", [("paper", (0.0, "wrong-answer")), ("reference", (1.0, None))])
def test_evalplus_oracles_decide_the_verdict(protocol, set_equal):
    """Mbpp/2 in another order passes evalplus 0.3.1's set-equality oracle (`reference`,
    eval/_special_oracle.py:10-11, eval/__init__.py:176-177) and fails the pinned commit's plain
    equality (`paper`, evalplus 1895d2f6 eval/__init__.py:137,161-164): the issue's
    list(set(a) & set(b)) among them; floats pass within atol under both."""
    task = make_task(protocol=protocol, tests="base")
    ids = ["Mbpp/2", "Mbpp/2", "Mbpp/82", "Mbpp/82", "Mbpp/3"]
    codes = [
        "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))",
        "def similar_elements(a, b):\n    return list(set(a) & set(b))",
        "import math\ndef volume_sphere(r):\n    return 4 / 3 * math.pi * r ** 3 + 1e-6",
        "def volume_sphere(r):\n    return 4.19 * r ** 3",
        "def is_not_prime(n):\n    return n % 2 == 0",
    ]
    results = task.score(ids, codes)
    assert [(r.score, r.error) for r in results] == [set_equal, set_equal, (1.0, None), (0.0, "wrong-answer"),
                                                     (0.0, "wrong-answer")]


def test_plus_tests_run_after_the_base_tests():
    """tests 'base+plus' (evalplus's MBPP+: evaluate.py:303-314 counts a pass only when the base
    and the plus check pass) against 'base' (the authors' mbpp_base_pass@1, tasks/mbpp.py:86)."""
    base_only = "def is_not_prime(n):\n    return n in (1, 10, 35)"
    honest = "def is_not_prime(n):\n    return n < 2 or any(n % k == 0 for k in range(2, int(n ** 0.5) + 1))"
    for tests, verdicts in (("base", [(1.0, None), (1.0, None)]), ("base+plus", [(0.0, "wrong-answer"), (1.0, None)])):
        task = make_task(tests=tests)
        assert len(task.inputs("Mbpp/3")) == (5 if tests == "base" else 7)
        assert len(task.groundtruth("Mbpp/3").outputs) == len(task.time_limits("Mbpp/3")) == len(task.inputs("Mbpp/3"))
        assert [(r.score, r.error) for r in task.score(["Mbpp/3", "Mbpp/3"], [base_only, honest])] == verdicts


def test_evaluate_scores_scripted_answers_in_each_prompt_format():
    task_ids = ["Mbpp/6", "Mbpp/8", "Mbpp/17"]
    replies = {
        "differ_At_One_Bit_Pos": "def differ_At_One_Bit_Pos(a, b):\n    x = a ^ b\n    return x > 0 and x & (x - 1) == 0\n```\nDone.",
        "square_nums": "def square_nums(nums):\n    return [n * 2 for n in nums]\n```\n",
        "square_perimeter": "def square_perimeter(a)\n    return 4 * a\n```\n",
    }
    variants = [("paper", {}, "generate", "syntax", True),
                ("reference", {}, "chat", "syntax", False),
                ("reference", {"prompt_format": "completion", "stop": None}, "generate", "no-entry-point", True)]
    for protocol, settings, method, broken, kept_explanation in variants:
        task = make_task(task_ids=task_ids, protocol=protocol, **settings)
        model = ScriptedModel(replies)
        results = task.evaluate(model, task_ids)
        assert [c[0] for c in model.calls] == [method]
        assert [(r.item_id, r.score, r.error) for r in results] == [
            ("Mbpp/6", 1.0, None), ("Mbpp/8", 0.0, "wrong-answer"), ("Mbpp/17", 0.0, broken)
        ], (protocol, settings)
        completion = results[0].detail["completion"]
        assert completion.startswith("def differ_At_One_Bit_Pos(a, b):")
        assert ("Done." in completion) == kept_explanation
        assert results[0].detail["solution"].endswith("return x > 0 and x & (x - 1) == 0")


@pytest.fixture
def host_traps():
    """A victim file and an escape path the sandboxed code will aim at, and a listening socket."""
    victim = REPO / f".mbpp-victim-{uuid.uuid4().hex[:8]}"
    escape = REPO / f".mbpp-escape-{uuid.uuid4().hex[:8]}"
    victim.write_text("precious")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    yield {"victim": victim, "escape": escape, "listener": listener, "port": listener.getsockname()[1]}
    listener.close()
    victim.unlink(missing_ok=True)
    escape.unlink(missing_ok=True)


def attacks(traps):
    """(name, solution for square_perimeter, the error it must be scored with)."""
    victim, escape, port = traps["victim"], traps["escape"], traps["port"]
    return [
        ("infinite loop", "def square_perimeter(a):\n    while True:\n        pass", "timeout"),
        ("loop with the alarm blocked",
         "import signal\ndef square_perimeter(a):\n    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
         "    while True:\n        pass", "timeout"),
        ("fork bomb", "import posix\ndef square_perimeter(a):\n    while True:\n        try:\n            posix.fork()\n"
         "        except OSError:\n            pass", "timeout"),
        ("10 GB allocation", "def square_perimeter(a):\n    block = bytearray(10 * 1024 ** 3)\n    return 4 * a", "memory"),
        ("write outside the work dir",
         f"import io\ndef square_perimeter(a):\n    io.open({str(escape)!r}, 'w').write('x')\n    return 4 * a", "runtime"),
        ("delete a host file", f"import posix\ndef square_perimeter(a):\n    posix.unlink({str(victim)!r})\n    return 4 * a",
         "runtime"),
        ("open a socket",
         f"import socket\ndef square_perimeter(a):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
         "    return 4 * a", "runtime"),
        ("huge stdout", "import os\ndef square_perimeter(a):\n    while True:\n        os.write(1, b'x' * 65536)",
         "output-limit"),
        ("os._exit before the tests", "import os\nos._exit(0)\ndef square_perimeter(a):\n    return 4 * a", "crash"),
        ("sys.exit(0) before the tests", "import sys\nsys.exit(0)\ndef square_perimeter(a):\n    return 4 * a", "runtime"),
        ("an always-equal result",
         "class Anything:\n    def __eq__(self, other):\n        return True\n"
         "def square_perimeter(a):\n    return Anything()", "wrong-answer"),
        ("monkeypatching evalplus's checker",
         "import evalplus.eval as ev\nimport evalplus.eval.utils as ut\n"
         "ev.untrusted_check = lambda *a, **k: ('pass', [True, True, True])\nut.time_limit = None\n"
         "def square_perimeter(a):\n    return -1", "wrong-answer"),
        ("forging result lines",
         "import os\ndef square_perimeter(a):\n    for fd in range(64):\n        try:\n"
         "            os.write(fd, b'{\"event\": \"done\"}\\n{\"index\": 0, \"status\": \"pass\"}\\n')\n"
         "        except OSError:\n            pass\n    os._exit(0)", "crash"),
        ("rewriting the harness's inputs",
         "import sys\ndef square_perimeter(a):\n    sys._getframe(1).f_locals['inputs'].clear()\n    return 4 * a",
         "crash"),
        ("syntax error", "def square_perimeter(a) return", "syntax"),
        ("no entry point", "def perimeter(a):\n    return 4 * a", "no-entry-point"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_completions_are_contained_and_scored_as_failures(kind, host_traps):
    task = make_task(sandbox=kind, timeout_seconds=4, startup_seconds=2.5, min_time_limit=0.5, parallel=2)
    cases = attacks(host_traps)
    correct = "def square_perimeter(a):\n    return 4 * a"
    ids = ["Mbpp/17"] * (len(cases) + 1)
    start = time.monotonic()
    results = task.score(ids, [code for _, code, _ in cases] + [correct])
    elapsed = time.monotonic() - start

    got = {name: (r.score, r.error) for (name, _, _), r in zip(cases, results)}
    assert got == {name: (0.0, error) for name, _, error in cases}
    assert (results[-1].score, results[-1].error) == (1.0, None)
    assert elapsed < 60
    assert host_traps["victim"].read_text() == "precious"
    assert not host_traps["escape"].exists()
    with pytest.raises(BlockingIOError):
        host_traps["listener"].accept()
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, b"evalplus_harness")]
    assert leftover == []


FORGE_RESULT_LINES = """\
import json, os, stat
def {entry_point}(*args):
    lines = [json.dumps({{"event": "output", "index": i, "value": v}}) for i, v in enumerate({values})]
    data = ("\\n".join(lines) + '\\n{{"event": "done"}}\\n').encode()
    theirs = {{os.fstat(0).st_ino, os.fstat(2).st_ino}}
    for fd in range(3, 64):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISFIFO(info.st_mode) and info.st_ino not in theirs:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    os._exit(0)
"""
"""A solution that writes its own result lines on the harness's channel (a pipe other than
stdin and stderr) instead of running: the host must treat whatever comes as hostile."""


def test_costly_outputs_cost_their_own_item_only():
    """#18.4: a forged output that is a set of 100,000 integers with equal hashes (hash(k * (2**61 - 1))
    is 0 for every k: building it takes about a minute) times out its own item; the host never
    builds it, and the correct solutions judged with it still pass. Each input has 5 s to run (the
    solution's own time limit is not what this test is about: on a loaded machine printing the
    forged line once took longer than the preset's 0.2 s), so the judge's limit is the one hit."""
    task = make_task(judge_seconds=0.5, min_time_limit=5.0)
    collide = '{"t": "set", "v": [k * (2 ** 61 - 1) for k in range(1, 100_000)]}'
    crafted = FORGE_RESULT_LINES.format(entry_point="square_perimeter", values=f"[{collide}, 20, 16]")
    ids = ["Mbpp/3", "Mbpp/17", "Mbpp/8"]
    codes = [canonical(task, "Mbpp/3"), crafted, canonical(task, "Mbpp/8")]
    before = resource.getrusage(resource.RUSAGE_SELF)
    results = task.score(ids, codes)
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, "timeout"), (1.0, None)]
    assert results[1].detail["status"] == "timeout" and "0.5 s each" in results[1].detail["message"]
    host_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert host_cpu < 10, f"the host spent {host_cpu:.1f} s of CPU on the results"


def test_forged_lines_are_judged_not_trusted():
    """Result lines a solution writes itself are judged like any output: right values pass,
    wrong or malformed ones fail, and nothing in them is decoded on the host."""
    task = make_task()
    forge = FORGE_RESULT_LINES.format
    codes = [forge(entry_point="square_perimeter", values="[40, 20, 16]"),
             forge(entry_point="square_perimeter", values="[40, 20, 17]"),
             forge(entry_point="square_perimeter", values='[40, 20, {"t": "object", "v": []}]'),
             forge(entry_point="square_perimeter", values="[40, 20]")]
    results = task.score(["Mbpp/17"] * len(codes), codes)
    assert [(r.score, r.error) for r in results] == [
        (1.0, None), (0.0, "wrong-answer"), (0.0, "wrong-answer"), (0.0, "crash")]


def _mentions(proc: Path, marker: bytes) -> bool:
    try:
        return int(proc.name) != os.getpid() and marker in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_check_backends_reports_data_and_sandbox(tmp_path):
    statuses = {s.name: s for s in make_task().check_backends()}
    assert statuses["evalplus"].ok and statuses["python sandbox"].ok and statuses["mbpp+ data"].ok
    missing = {s.name: s for s in make_task(tmp_path / "none.jsonl").check_backends()}
    assert not missing["mbpp+ data"].ok and "does not exist" in missing["mbpp+ data"].message


# ------------------------------------------------------------- real engine, end to end


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.engines.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("mbpp-llama") / "m", seed=11)
    return TransformersEngine(model_dir, device="cpu", settings=TransformersSettings(chat_template="instruction-response", batch_size=2))


def test_evaluate_with_a_real_model_and_sandbox(tiny_engine):
    ids = ["Mbpp/3", "Mbpp/17", "Mbpp/82"]
    for protocol in ("paper", "reference"):
        task = make_task(task_ids=ids, protocol=protocol, max_new_tokens=24)
        results = task.evaluate(tiny_engine, ids)
        assert [r.item_id for r in results] == ids
        assert all(r.score == 0.0 and r.error in ERROR_CLASSES for r in results)
        if protocol == "paper":
            want = tiny_engine.generate([task.prompt_text(i) for i in ids], max_new_tokens=24, stop=task.stop_strings())
        else:
            want = tiny_engine.chat([task.conversation(i) for i in ids], max_new_tokens=24, stop=task.stop_strings())
        assert [r.detail["completion"] for r in results] == want
        again = task.evaluate(tiny_engine, ids[::-1])[::-1]
        assert [(r.item_id, r.error, r.detail) for r in again] == [(r.item_id, r.error, r.detail) for r in results]


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_the_per_check_wall_time_rule(protocol):
    """A run's wall bound: start-up, then per check (base; plus for base+plus) the summed per-input
    limits plus evalplus's 3 s slack, capped at 60 s by evalplus 0.3.1 (eval/__init__.py:236,
    `reference`) and uncapped by the pinned commit (1895d2f6 eval/__init__.py:196-199,224, `paper`)."""
    task = make_task(protocol=protocol, min_time_limit=25.0, gt_time_limit_factor=1.0)
    item = "Mbpp/3"
    base = len(task.problems[item]["base_input"])
    checks = [25.0 * base] + ([25.0 * (len(task.inputs(item)) - base)] if protocol == "reference" else [])
    assert checks[0] > 60
    cap = {"paper": None, "reference": 60.0}[protocol]
    assert task.settings.timeout_seconds == cap
    expected = task.settings.startup_seconds + sum((c if cap is None else min(cap, c)) + 3.0 for c in checks)
    assert task.run_wall(item) == pytest.approx(expected)
    assert task.item_seconds(item) > 2 * expected


def test_a_prompt_past_the_models_context_is_that_items_result():
    """An engine's ContextOverflow (engines/base.py) scores its item 0 with error context-limit;
    the other items of the chunk are run and judged as usual."""
    from cqd_mpi.engines.base import ContextOverflow

    class Overflowing(ScriptedModel):
        def generate(self, prompts, *, max_new_tokens, stop=()):
            texts = super().generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
            return [ContextOverflow(prompt_tokens=600, context_length=512) if "is_not_prime" in p else t
                    for p, t in zip(prompts, texts)]

    model = Overflowing({"square_perimeter": "def square_perimeter(a):\n    return 4 * a\n```\n"})
    results = make_task().evaluate(model, ["Mbpp/3", "Mbpp/17"])
    assert [(r.item_id, r.score, r.error) for r in results] == [("Mbpp/3", 0.0, "context-limit"), ("Mbpp/17", 1.0, None)]
    assert results[0].detail == {"status": "context-limit", "message": "the prompt has 600 tokens, which leaves no "
                                 "room for a reply within the model's context of 512"}
