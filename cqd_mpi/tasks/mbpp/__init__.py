"""MBPP+ (evalplus): greedy pass@1, generated code run in a sandbox, scored as a protocol says.

Data come from evalplus's MbppPlus jsonl (its release in evalplus's cache dir, the file named
by MBPP_OVERRIDE_PATH, or `data:` in the task config), read with evalplus's own deserializer;
nothing is downloaded. How a problem becomes a prompt, a completion becomes code, and code a
verdict is a set of settings, tabled by protocol in cqd_mpi.tasks.protocols: `paper` (the
CycleQD authors' instruction, format, stops and text sanitizer, base tests of MbppPlus v0.1.0;
tasks/mbpp/authors.py) or `reference` (evalplus 0.3.1's codegen, sanitizer and evaluate on
v0.2.0, base and extra tests). Each completion runs in a fresh sandbox (cqd_mpi.sandboxes)
that never sees the expected outputs; evalplus's `untrusted_check` then scores the recorded
outputs in a second sandbox run, so a completion cannot fake its own verdict. docs/mbpp.md and
docs/protocols.md have the details.

Modules: `settings`, `data` (MbppPlus files), `authors` (the CycleQD authors' prompt and text
sanitizer), `harness` (what a sandboxed run reports, the judge's verdicts), `task` (MbppPlusTask).
"""

from cqd_mpi.tasks.mbpp.data import default_data_path, load_problems, read_jsonl
from cqd_mpi.tasks.mbpp.harness import (
    HARNESS,
    JUDGE_ERRORS,
    JUDGE_ITEM_SECONDS,
    VERDICTS,
    Groundtruth,
    RunRecord,
)
from cqd_mpi.tasks.mbpp.settings import (
    INSTRUCTION_PREFIX,
    RESPONSE_PREFIX,
    SYSTEM_MESSAGE,
    Settings,
)
from cqd_mpi.tasks.mbpp.task import CHAT_STOP, TEXT_EXCERPT_CHARS, MbppPlusTask

__all__ = [
    "CHAT_STOP", "HARNESS", "INSTRUCTION_PREFIX", "JUDGE_ERRORS", "JUDGE_ITEM_SECONDS", "RESPONSE_PREFIX",
    "SYSTEM_MESSAGE", "TEXT_EXCERPT_CHARS", "VERDICTS", "Groundtruth", "MbppPlusTask", "RunRecord", "Settings",
    "default_data_path", "load_problems", "read_jsonl",
]
