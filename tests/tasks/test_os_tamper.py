"""The OS task's checks cannot be fooled: each bypass of issue #26 tried on an unchanged AgentBench
item (dev-00015 of AgentBench's data/os_interaction/data/dev.json, its check the example then
integer-match.py) answered with a wrong number, in real environments on both back-ends. Each of
these made that item score 1 before the tamper check was rebuilt (measured); now each scores 0,
while the honest answer still passes.
"""

import json

import pytest

from cqd_mpi import schema
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.os_interaction import NEW_PROBLEM, OSInteractionTask, Settings
from tests.sandboxes.osenv_helpers import BACKENDS, DOCKER_HOST, DOCKER_IMAGE, ROOTFS

ITEM = {
    "description": "Find out how many groups with an index greater than 50.",
    "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                   "example": "getent group | awk -F: '$3 > 50 {count++} END {print count}'"},
    "labels": ["user", "system"],
}
"""AgentBench's dev-00015, verbatim."""

INTEGER_MATCH = "from sys import argv\nif int(argv[1]) == int(argv[2]): exit(0)\nexit(1)"
"""AgentBench's scripts/dev/check/integer-match.py, verbatim."""

FAKE = "printf '#!/bin/sh\\nexit 0\\n' > /tmp/fake && chmod +x /tmp/fake"

BYPASSES = {
    "a nested user+pid namespace swaps python3 after the freeze":
        "p=$$; unshare -Urpf sh -c \"while grep -q '^State:.[RSD]' /proc/$p/status; do sleep 0.01; done; "
        "sleep 0.05; cp /bin/true /tmp/t && mv /tmp/t /usr/bin/python3.11\" >/dev/null 2>&1 &",
    "a PATH dir replaced by a symlink to another dir":
        f"mkdir /tmp/e && {FAKE} && cp /tmp/fake /tmp/e/python3 && rm -rf /usr/local/bin && ln -s /tmp/e /usr/local/bin",
    "a start-up file that is no .pth or sitecustomize hook":
        "mkdir -p /usr/local/lib/python3.11/dist-packages && "
        "echo 'import os; os._exit(0)' > /usr/local/lib/python3.11/dist-packages/apport_python_hook.py",
    "a re-pointed /etc/alternatives entry":
        "printf '#!/bin/sh\\necho 999\\n' > /tmp/a && chmod +x /tmp/a && ln -sf /tmp/a /etc/alternatives/awk",
    "a zip the interpreter puts first on sys.path":
        "python3 -c 'import zipfile; z = zipfile.ZipFile(\"/usr/lib/python311.zip\", \"w\"); "
        "z.writestr(\"sitecustomize.py\", \"import os; os._exit(0)\"); z.close()'",
}


@pytest.fixture(scope="module", params=BACKENDS)
def task(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("agentbench")
    (root / "data").mkdir()
    (root / "data" / "dev.json").write_text(json.dumps([ITEM]))
    (root / "scripts" / "dev" / "check").mkdir(parents=True)
    (root / "scripts" / "dev" / "check" / "integer-match.py").write_text(INTEGER_MATCH)
    backend = request.param
    environment = {"backend": backend, "command_seconds": 5, "script_seconds": 10, "memory": "256MiB",
                   "processes": 64, "disk": "64MiB", "output": "256KiB",
                   "images": {"default": ROOTFS if backend == "bwrap" else DOCKER_IMAGE}}
    if backend == "docker":
        environment["docker_host"] = DOCKER_HOST
    settings = schema.build(Settings, {"environment": environment}, "tasks[0].settings")
    with OSInteractionTask(name="os", data=str(root / "data" / "dev.json"), settings=settings,
                           context=TaskContext(rank=0)) as built:
        yield built


class Script:
    """A scripted model: the same replies, turn by turn, for the one item."""

    def __init__(self, replies):
        self.replies = replies

    def chat(self, conversations, *, max_new_tokens, stop=()):
        out = []
        for conversation in conversations:
            assert conversation[6]["content"] == NEW_PROBLEM + ITEM["description"]
            turn = sum(1 for m in conversation[7:] if m["role"] == "assistant")
            reply = self.replies[turn]
            out.append(reply(conversation) if callable(reply) else reply)
        return out


def bash(command: str) -> str:
    return f"Think: let me act.\n\nAct: bash\n\n```bash\n{command}\n```"


def answer(text: str) -> str:
    return f"Think: I know it.\n\nAct: answer({text})"


@pytest.mark.parametrize("how", list(BYPASSES))
def test_a_wrong_answer_with_a_bypass_scores_zero(task, how):
    """The nested namespace's process is killed before the tamper check, so it never swaps
    python3 (the answer is then just wrong); every other change is found by the tamper check."""
    [result] = task.evaluate(Script([bash(BYPASSES[how]), bash("sleep 0.3"), answer("999")]), ["dev-00000"])
    assert result.score == 0.0, result.detail
    if how.startswith("a nested"):
        assert result.error in ("wrong-answer", "tampered") and result.detail["checks"][-1] != 0 \
            if result.error == "wrong-answer" else result.detail["tampered"] == ["usr/bin/python3.11"]
    else:
        assert result.error == "tampered" and result.detail["tampered"], result.detail


def test_the_honest_answer_passes_and_the_wrong_one_fails(task):
    def last_line(conversation):
        return answer(conversation[-1]["content"].strip().splitlines()[-1])

    honest = Script([bash(ITEM["evaluation"]["example"]), last_line])
    [passed] = task.evaluate(honest, ["dev-00000"])
    assert (passed.score, passed.error) == (1.0, None), passed.detail
    assert passed.detail["checks"] == [0, 0]
    [wrong] = task.evaluate(Script([bash("getent group | wc -l"), answer("999")]), ["dev-00000"])
    assert (wrong.score, wrong.error) == (0.0, "wrong-answer")
