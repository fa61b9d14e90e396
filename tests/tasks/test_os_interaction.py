"""AgentBench's OS task: its data, protocol and judgement, with scripted policies in real environments.

The policies stand in for a model (they answer `chat` as TransformersEngine does); every
environment is real: bwrap here, docker through podman's socket (marked `docker`). The items
are written by the tests in AgentBench's layout (data/<set>.json beside scripts/<set>/).
"""

import json
import shutil
import time
from pathlib import Path

import pytest

from cqd_mpi import schema
from cqd_mpi.errors import BackendUnavailable, ConfigError, TaskError
from cqd_mpi.tasks import task_class
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.os_interaction import (
    EMPTY,
    INSTRUCTION,
    NEW_PROBLEM,
    OSInteractionTask,
    Settings,
    extract_action,
    load_items,
    observation,
    opening,
    terminal_prompt,
)
from tests.sandboxes.osenv_helpers import BACKENDS, DOCKER_HOST, DOCKER_IMAGE, ROOTFS
from tests.tasks.os_items import GREET_EXAMPLE, INTEGER_MATCH, ITEMS, write_items

DESCRIPTIONS = {item["description"]: index for index, item in enumerate(ITEMS)}
IDS = [f"dev-{i:05d}" for i in range(len(ITEMS))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("os_interaction"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make_task(data_file, *, backend="bwrap", rank=0, **settings):
    environment = {"backend": backend, "command_seconds": 3, "script_seconds": 10, "memory": "256MiB",
                   "processes": 64, "disk": "64MiB", "output": "256KiB", **settings.pop("environment", {})}
    environment.setdefault("images", {"default": ROOTFS if backend == "bwrap" else DOCKER_IMAGE})
    if backend == "docker":
        environment.setdefault("docker_host", DOCKER_HOST)
    built = schema.build(Settings, {"environment": environment, **settings}, "tasks[0].settings")
    return OSInteractionTask(name="os", data=str(data_file), settings=built, context=TaskContext(rank=rank))


class Policy:
    """A scripted stand-in for a model: replies chosen from the item each conversation is about."""

    def __init__(self, replies):
        self.replies = replies
        self.conversations = {}
        self.batches = []

    def chat(self, conversations, *, max_new_tokens, stop=()):
        assert max_new_tokens == 512
        self.batches.append(len(conversations))
        out = []
        for conversation in conversations:
            index = DESCRIPTIONS[conversation[6]["content"].removeprefix(NEW_PROBLEM)]
            self.conversations[index] = conversation
            turn = sum(1 for m in conversation[7:] if m["role"] == "assistant")
            plan = self.replies[index]
            out.append(plan[turn] if isinstance(plan, list) else plan(turn, conversation))
        return out


def bash(command: str) -> str:
    return f"Think: let me look.\n\nAct: bash\n\n```bash\n{command}\n```"


def answer(text: str) -> str:
    return f"Think: I know it.\n\nAct: answer({text})"


FINISH = "Think: done.\n\nAct: finish"


# ----------------------------------------------------------------------- data


def test_agentbench_layouts_load_with_stable_ids(data, tmp_path):
    items = load_items(data / "data" / "dev.json")
    assert [i.item_id for i in items] == IDS
    assert items[1].init[1].code == "touch /root/d/a /root/d/b /root/d/c\n" and items[1].check[0] is None
    assert items[1].check[1].language == "python" and items[1].check[1].code == INTEGER_MATCH
    assert items[0].match == {"answer": "world", "strip": True} and items[0].image == "local-os/default"
    assert items[4].start.code == "export SECRET=42"
    assert (items[5].init, items[5].image) == ((), "local-os/default")
    standard = tmp_path / "standard"
    for group, name in (("1", "files"), ("2", "users")):
        (standard / "data" / group).mkdir(parents=True)
        (standard / "data" / group / f"{name}.json").write_text(json.dumps(ITEMS[1:3]))
        (standard / "scripts" / group).mkdir(parents=True)
        for script in ("check/integer-match.py", "check/greet.sh", "example/greet.sh", "init/mk.sh"):
            (standard / "scripts" / group / script).parent.mkdir(parents=True, exist_ok=True)
            (standard / "scripts" / group / script).write_text((data / "scripts" / "dev" / script).read_text())
    (standard / "data" / "dev.json").write_text("[]")
    ids = [i.item_id for i in load_items(standard)]
    assert ids == ["1/files-00000", "1/files-00001", "2/users-00000", "2/users-00001"]
    (standard / "data" / "dev.json").write_text(json.dumps(ITEMS[1:2]))
    shutil.copytree(data / "scripts" / "dev", standard / "scripts" / "dev")
    assert [i.item_id for i in load_items(standard, include_dev=True)] == [*ids, "dev-00000"]


def test_agentbench_sample_ids_name_this_tasks_items():
    """The `paper` protocol's list (AgentBench sample ids) maps onto the ids this task gives."""
    from cqd_mpi.tasks import protocols
    from cqd_mpi.tasks.os_interaction import from_agentbench_id

    assert from_agentbench_id("std-001-stock-00001") == "1/stock-00001"
    assert from_agentbench_id("std-004-N225-00000") == "4/N225-00000"
    assert from_agentbench_id("dev-001-dev-00003") == "dev-00003"
    assert from_agentbench_id("7/bootstrap-00002") == "7/bootstrap-00002"
    mapped = [from_agentbench_id(i) for i in protocols.item_ids("os", "cycleqd", "item_ids")]
    assert len(set(mapped)) == 110 and all("/" in i or i.startswith("dev-") for i in mapped)
    assert protocols.OS["paper"]["include_dev"] and not protocols.OS["reference"]["include_dev"]


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("description"), r"entry 0: key 'description' should be a string"),
    (lambda e: e.update(evaluation={"labels": []}), r"entry 0: evaluation needs 'match' or 'check'"),
    (lambda e: e.update(evaluation={"check": {"file": "check/nope.sh"}}), r"entry 0: evaluation\.check\.file: cannot read"),
    (lambda e: e.update(evaluation={"check": {"code": "x", "language": "c++"}}), r"evaluation\.check\.language: expected one of bash, python, got 'c\+\+'"),
    (lambda e: e.update(evaluation={"check": [None]}), r"has a null entry \(the example\) but no evaluation\.example"),
    (lambda e: e.update(create={"init": [None]}), r"create\.init holds a null script"),
    (lambda e: e.update(evaluation={"match": {"exact": "x"}}), r"evaluation\.match should be a string, \{answer\} or \{regex\}"),
])
def test_bad_entries_name_the_file_the_entry_and_the_key(data, tmp_path, change, message):
    entry = json.loads(json.dumps(ITEMS[0]))
    change(entry)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.json").write_text(json.dumps([entry]))
    (tmp_path / "scripts" / "bad").mkdir(parents=True)
    with pytest.raises(TaskError, match=message):
        load_items(tmp_path / "data" / "bad.json")


def test_settings_are_typed_and_checked(data):
    assert task_class("os") is OSInteractionTask
    settings = schema.build(Settings, {"environment": {"backend": "docker", "disk": "1GB"}, "max_rounds": 8}, "s")
    assert settings.environment.limits().disk_bytes == 10**9 and settings.max_rounds == 8
    assert Settings().max_rounds == 5 and Settings().environment.command_seconds == 30
    with pytest.raises(ConfigError, match=r"s\.environment\.backend: expected one of 'bwrap' \| 'docker'"):
        schema.build(Settings, {"environment": {"backend": "apptainer"}}, "s")
    with pytest.raises(ConfigError, match=r"s\.environment\.memory: expected a size"):
        schema.build(Settings, {"environment": {"memory": "lots"}}, "s")
    with pytest.raises(ConfigError, match=r"s\.repeats: expected an integer >= 1, got 0"):
        schema.build(Settings, {"repeats": 0}, "s")
    with pytest.raises(ConfigError, match=r"s\.turn_seconds: expected a number > 0 or null, got 0"):
        schema.build(Settings, {"turn_seconds": 0}, "s")
    with pytest.raises(ConfigError, match=r"s\.observation: expected one of 'cleaned' \| 'raw'"):
        schema.build(Settings, {"observation": "ansi"}, "s")
    task = make_task(data / "data" / "dev.json", environment={"images": {"default": "/nowhere.tar"}})
    assert task.settings.environment.image_for("local-os/default") == "/nowhere.tar"
    with pytest.raises(TaskError, match=r"no bwrap image for 'local-os/ubuntu'"):
        task.settings.environment.image_for("local-os/ubuntu")
    with pytest.raises(TaskError, match=r"settings\.item_ids names 'dev-99999'"):
        make_task(data / "data" / "dev.json", item_ids=["dev-99999"]).item_ids()


# ------------------------------------------------------------------- protocol


def test_actions_are_parsed_as_agentbench_extract_action_parses_them():
    assert extract_action(bash("ls")) == ("bash", "ls")
    two = "Act: bash\n```bash\ncd /tmp\n```\ntext\n```bash\npwd\n```"
    assert extract_action(two) == ("bash", "cd /tmp\n\npwd")
    assert extract_action("Act: bash\nno block") == ("bash", "")
    assert extract_action("Think: x\nAct: answer(42)") == ("commit", "42")
    assert extract_action("Act: answer( (a) b )") == ("commit", " (a) b ")
    assert extract_action("Act: finish") == ("commit", None)
    assert extract_action("Act: bash\n```bash\nls\n```\nAct: answer(7)") == ("commit", "7")
    assert extract_action("Act: answer(7)\nAct: answer no parentheses") == ("commit", "7")
    assert extract_action("Act: Bash\n```bash\nls\n```") == ("bash", "ls")
    assert extract_action("I think the answer is 7") == (None, None)
    assert extract_action("Act: run ls") == (None, None)


def test_observations_are_cut_and_worded_as_agentbench_does():
    assert observation("") == EMPTY == "The output of the OS is empty."
    assert observation("hi\r\n") == "The output of the OS:\n\nhi\r\n"
    exact = "x" * 800
    assert observation(exact) == "The output of the OS:\n\n" + exact
    assert observation("y" * 801) == "The output of the OS:\n\n" + "y" * 780 + "\n[truncated because the output is too long]"


def test_the_conversation_is_agentbench_one_shot_prompt():
    history = opening("Count the files.")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert history[0]["content"] == INSTRUCTION + 'Now, my problem is:\n\ntell me how many files are in the directory "/etc"?'
    assert INSTRUCTION.startswith("You are an assistant that will act like a person, I'will play the role of linux(ubuntu)")
    assert INSTRUCTION.endswith("you should take only exact one of the three actions in each turn.\n\n")
    assert history[5]["content"] == "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"
    assert history[6]["content"] == "Now, I will start a new problem in a new OS. My problem is:\n\nCount the files."


# ---------------------------------------------------------- the harness, end to end


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_a_failing_init_script_ends_the_item_or_is_ignored_per_protocol(data, protocol):
    """The item whose init script exits 3: AgentBench v0.2 ends it unjudged (src/server/tasks/
    os_interaction/task.py:409-416, `reference`); the authors' code ignores the exit status and
    plays on (SakanaAI/CycleQD evaluation/fishfarm/fishfarm/tasks/os_interaction.py:441-443,
    `paper`), so the answer x then passes its match."""
    from cqd_mpi.tasks import protocols

    setting = protocols.OS[protocol]["init_failure"]
    with make_task(data / "data" / "dev.json", init_failure=setting) as task:
        (result,) = task.evaluate(Policy({6: [answer("x")]}), [IDS[6]])
    assert (result.score, result.error) == ({"paper": (1.0, None), "reference": (0.0, "init")}[protocol])


def test_the_reference_ceiling_and_an_item_that_cannot_be_set_up(data, backend):
    with make_task(data / "data" / "dev.json", backend=backend) as task:
        results = task.reference_results(IDS)
        assert [r.score for r in results] == [1.0] * 6 + [0.0]
        broken = results[6]
        assert broken.error == "init" and "exited 3: broken" in broken.detail["message"]
        assert results[1].detail["answer"] == "3" and results[1].detail["checks"] == [0, 0]
        assert results[3].detail["checks"] == [0]
        assert task.metric(results) == pytest.approx(6 / 7)


def test_the_shell_keeps_state_across_turns_and_the_start_script_runs_in_it(data):
    replies = {
        0: [bash("cd /root"), bash("cat hello.txt"), answer("world")],
        1: [bash("N=$(ls /root/d | wc -l)"), bash("echo $N"), answer(" 3 ")],
        4: [bash("echo $SECRET"), answer("42")],
    }
    policy = Policy(replies)
    with make_task(data / "data" / "dev.json") as task:
        results = task.evaluate(policy, ["dev-00000", "dev-00001", "dev-00004"])
    assert [(r.score, r.error) for r in results] == [(1.0, None), (1.0, None), (1.0, None)]
    assert policy.batches == [3, 3, 2]
    assert policy.conversations[0][8]["content"] == "The output of the OS is empty."
    assert policy.conversations[0][10]["content"] == "The output of the OS:\n\nworld"
    assert policy.conversations[1][10]["content"] == "The output of the OS:\n\n3\r\n"
    assert results[0].detail["commands"] == ["cd /root", "cat hello.txt"] and results[0].detail["rounds"] == 3


def test_wrong_answers_invalid_actions_and_the_round_limit_fail(data):
    replies = {
        0: [answer("wrong")],
        1: ["I would rather not."],
        2: [bash("true")] * 5,
        3: [FINISH],
    }
    with make_task(data / "data" / "dev.json") as task:
        results = task.evaluate(Policy(replies), IDS[:4])
    assert [(r.score, r.error) for r in results] == [(0.0, "wrong-answer"), (0.0, "invalid-action"),
                                                     (0.0, "round-limit"), (0.0, "wrong-answer")]
    assert results[2].detail["rounds"] == 5 and len(results[2].detail["commands"]) == 5


@pytest.mark.parametrize("protocol, expected", [("paper", [1.0, 1.0]), ("reference", [0.0, 0.0])])
def test_judge_unfinished_judges_like_the_cycleqd_authors_code(data, protocol, expected):
    """An episode at the round limit (item 2) and one whose reply has no action (item 3): the
    authors judge both with an empty answer (SakanaAI/CycleQD evaluation/fishfarm/fishfarm/tasks/
    os_interaction.py:355-357,550-553: `paper`), AgentBench v0.2 fails them (src/server/tasks/
    os_interaction/task.py:486-495,517-521: `reference`); 5 rounds under both here."""
    from cqd_mpi.tasks import protocols

    replies = {2: [bash("true")] * 4 + [bash(GREET_EXAMPLE)], 3: [bash("chmod u-s /usr/bin/find"), "no action"]}
    judge = protocols.OS[protocol]["judge_unfinished"]
    with make_task(data / "data" / "dev.json", judge_unfinished=judge, max_rounds=5) as task:
        results = task.evaluate(Policy(replies), ["dev-00002", "dev-00003"])
        assert [r.score for r in results] == expected



@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_a_slow_command_ends_the_turn_per_protocol(data, protocol):
    """A command that runs 6 s. The authors wait 5 s for a turn (SakanaAI/CycleQD evaluation/
    fishfarm/fishfarm/tasks/os_interaction.py:337 `timeout: float = 5.0`, :504-507 a timed-out
    turn becomes `("", True)`, judged with that empty answer at :520-525: `paper`); AgentBench v0.2
    reads a command's output for up to 30 s (src/server/tasks/os_interaction/task.py:67-74) and
    plays on (`reference`), so item 0's answer after it is right there only."""
    from cqd_mpi.tasks import protocols

    turn = protocols.OS[protocol]["turn_seconds"]
    replies = {0: [bash("sleep 6; cat /root/hello.txt"), answer("world")]}
    policy = Policy(replies)
    with make_task(data / "data" / "dev.json", turn_seconds=turn, environment={"command_seconds": 10}) as task:
        (result,) = task.evaluate(policy, [IDS[0]])
    if protocol == "paper":
        assert (result.score, result.error, result.detail["rounds"]) == (0.0, "turn-limit", 1)
        assert result.detail["answer"] == "" and "turn_seconds (5 s)" in result.detail["message"]
    else:
        assert (result.score, result.error, result.detail["rounds"]) == (1.0, None, 2)
        assert policy.conversations[0][8]["content"] == "The output of the OS:\n\nworld"


RED_795 = "printf '\\e[1;31m%s\\e[0m\\n' $(printf 'y%.0s' $(seq 795))"
"""795 characters in red: 797 once AgentBench's clean-up removed the colour codes, more raw."""

Y_768 = "printf 'y%.0s' $(seq 768); echo"
"""770 characters: 789 raw, 829 with the authors' prompt in /root (`~`)."""

READLINE_END, READLINE_START = "\x1b[?2004l\r\r\n", "\x1b[?2004h"
"""What readline writes around a command's output: bracketed paste off, the accepted line, on."""


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_the_observation_is_cleaned_or_raw_before_the_cut_per_protocol(data, protocol):
    """AgentBench v0.2 removes escape sequences and BELs before the 800-character cut (src/server/
    tasks/os_interaction/task.py:90-102, cut at :505-508: `reference`, 797 characters shown whole);
    the authors' Container.execute returns the terminal's text as read, up to and including bash's
    prompt (SakanaAI/CycleQD evaluation/fishfarm/fishfarm/tasks/os_interaction.py:278-293: it reads
    until a chunk matches `\\x1b.+@.+[#|$] `, :286-287, and cleans nothing) and cuts that
    (:366-368: `paper`), so the colour codes count and the output is truncated at 780. Their prompt
    is Ubuntu's root .bashrc's for TERM=xterm (protocol.terminal_prompt): the xterm title, then
    `root@<host>:<cwd># `, with the cwd after the command (`~` for /root); with it, 770
    characters of output (789 raw) pass the cut as well."""
    from cqd_mpi.tasks import protocols

    shown = protocols.OS[protocol]["observation"]
    replies = {0: [bash("echo hi"), bash("cd ~"), bash(RED_795), bash(Y_768), answer("world")]}
    policy = Policy(replies)
    with make_task(data / "data" / "dev.json", observation=shown) as task:
        (result,) = task.evaluate(policy, [IDS[0]])
    assert result.score == 1.0
    texts = [policy.conversations[0][n]["content"] for n in (8, 10, 12, 14)]
    if protocol == "reference":
        assert texts[0] == "The output of the OS:\n\nhi\r\n"
        assert texts[1] == EMPTY
        assert texts[2] == "The output of the OS:\n\n" + "y" * 795 + "\r\n"
        assert texts[3] == "The output of the OS:\n\n" + "y" * 768 + "\r\n"
        return
    assert terminal_prompt("/") == "\x1b]0;root@cqd-os: /\x07root@cqd-os:/# "
    assert texts[0] == "The output of the OS:\n\n" + READLINE_END + "hi\r\n" + READLINE_START + terminal_prompt("/")
    assert texts[1] == "The output of the OS:\n\n" + READLINE_END + READLINE_START + \
        "\x1b]0;root@cqd-os: ~\x07root@cqd-os:~# "
    for text in texts[2:]:
        body = text.removeprefix("The output of the OS:\n\n")
        assert body.endswith("\n[truncated because the output is too long]")
        assert len(body) == 780 + len("\n[truncated because the output is too long]")
        assert body.startswith(READLINE_END)  # readline's bracketed-paste end, task.py:99 removes it
        assert "root@cqd-os" not in body
    assert "\x1b[1;31m" + "y" * 10 in texts[2] and texts[2].count("y") < 780
    assert texts[3] == "The output of the OS:\n\n" + READLINE_END + "y" * 768 + "\r" + \
        "\n[truncated because the output is too long]"  # 789 raw characters alone would be shown whole


TAMPERING = {
    "python3 replaced": (1, "cp /bin/true /tmp/t && mv /tmp/t /usr/bin/python3.11"),
    "bash replaced": (3, "cp /bin/true /tmp/t && mv /tmp/t /usr/bin/bash"),
    "python3 shadowed on PATH": (1, "printf '#!/bin/sh\\nexit 0\\n' > /usr/local/bin/python3; chmod +x /usr/local/bin/python3"),
    "awk shadowed on PATH": (3, "ln -s /bin/true /usr/local/bin/awk"),
    "a .pth start-up hook": (1, "mkdir -p /usr/local/lib/python3.11/dist-packages; "
                                "echo 'import os; os._exit(0)' > /usr/local/lib/python3.11/dist-packages/zz.pth"),
    "ld.so.preload": (3, "echo /nonexistent.so > /etc/ld.so.preload"),
    "a later swap by a background job": (1, "(sleep 0.5; cp /bin/true /tmp/t && mv /tmp/t /usr/bin/python3.11) "
                                            ">/dev/null 2>&1 &"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_check_fooled_by_changed_tools_scores_zero(data, backend, how):
    """Item 1's check runs python3 (integer-match) on a wrong answer, item 3's runs bash and awk on a
    /usr/bin/find that still has its SUID bit. With the tamper check switched off, every change here
    but ld.so.preload makes its check pass (measured); with it, each is caught and scores 0."""
    index, command = TAMPERING[how]
    replies = {index: [bash(command), bash("sleep 1"), answer("999") if index == 1 else FINISH],
               2: [bash(GREET_EXAMPLE), FINISH]}
    with make_task(data / "data" / "dev.json", backend=backend) as task:
        fooled, honest = task.evaluate(Policy(replies), [IDS[index], "dev-00002"])
    assert (fooled.score, fooled.error) == (0.0, "tampered"), fooled.detail
    assert fooled.detail["tampered"] and "checks" not in fooled.detail
    assert (honest.score, honest.error) == (1.0, None)


HOSTILE = {
    0: "bomb() { bomb | bomb & }; bomb",
    1: "sleep 1000",
    2: "rm -rf --no-preserve-root / 2>/dev/null",
    3: "head -c 1000000000 /dev/zero | tr '\\0' x",
    5: "echo exit > /proc/1/fd/0; sleep 2",
}


def test_hostile_commands_fail_their_item_only(data, backend):
    replies = {i: [bash(command), FINISH] for i, command in HOSTILE.items()}
    replies[5] = [bash(HOSTILE[5]), bash("echo still here"), answer("0")]
    replies[4] = [bash("echo $SECRET"), answer("42")]
    with make_task(data / "data" / "dev.json", backend=backend, parallel=6) as task:
        started = time.monotonic()
        results = task.evaluate(Policy(replies), IDS[:6])
        assert time.monotonic() - started < 40
        assert [r.score for r in results[:5]] == [0.0, 0.0, 0.0, 0.0, 1.0]
        if backend == "docker":
            assert (results[5].score, results[5].error) == (0.0, "action"), results[5].detail
        else:
            assert results[5].score == 1.0
        assert len(results[3].detail["outputs"][0]) <= 2000
        again = task.reference_results(["dev-00002"])
        assert again[0].score == 1.0


def test_repeats_score_the_mean_of_fresh_passes(data):
    def flaky(turn, conversation):
        if turn == 0:
            return bash("cat /root/count 2>/dev/null; echo x >> /root/count")
        return answer("world")

    with make_task(data / "data" / "dev.json", repeats=3) as task:
        [result] = task.evaluate(Policy({0: flaky}), ["dev-00000"])
    assert result.score == 1.0 and result.detail["scores"] == [1.0, 1.0, 1.0]
    assert [p["outputs"] for p in result.detail["passes"]] == [[""]] * 3


def test_what_the_model_reads_is_the_same_on_every_rank(data):
    replies = {0: [bash("hostname; id; pwd; ls -la /root | awk '{print $1, $NF}'"), bash("echo $$ $PPID"), answer("world")],
               3: [bash("ls -l /usr/bin/find | cut -c1-10"), bash("chmod u-s /usr/bin/find"), FINISH]}
    seen = []
    for rank in (1, 2):
        policy = Policy(replies)
        with make_task(data / "data" / "dev.json", rank=rank) as task:
            assert [r.score for r in task.evaluate(policy, ["dev-00000", "dev-00003"])] == [1.0, 1.0]
        seen.append(policy.conversations)
    assert seen[0] == seen[1]
    assert seen[0][0][8]["content"].startswith("The output of the OS:\n\ncqd-os\r\nuid=0(root)")


def test_check_backends_report_data_bwrap_and_the_image(data, tmp_path):
    with make_task(data / "data" / "dev.json") as task:
        statuses = {s.name: s for s in task.check_backends()}
    assert statuses["os data"].ok and "7 items" in statuses["os data"].message
    assert statuses["os environment (bwrap)"].ok and "namespaces work" in statuses["os environment (bwrap)"].message
    assert "isolation: a range of 65536 host uids of its own" in statuses["os environment (bwrap)"].message
    assert "a seccomp filter refusing what Docker" in statuses["os environment (bwrap)"].message
    assert statuses["os image local-os/default (bwrap)"].ok
    with make_task(data / "data" / "dev.json", environment={"images": {"default": str(tmp_path / "none.tar")}}) as task:
        missing = {s.name: s for s in task.check_backends()}["os image local-os/default (bwrap)"]
    assert not missing.ok and "build it with env/os-image.sh" in missing.message


@pytest.mark.docker
def test_check_backends_report_the_docker_engine_and_image(data):
    with make_task(data / "data" / "dev.json", backend="docker") as task:
        statuses = {s.name: s for s in task.check_backends()}
    assert statuses["os environment (docker)"].ok and statuses["os image local-os/default (docker)"].ok


@pytest.mark.slow
def test_a_tiny_transformers_llama_runs_through_the_task(data, tmp_path):
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.engines.tiny import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)
    config = json.loads((tiny / "config.json").read_text())  # AgentBench's prompt is over 1024 tiny tokens
    (tiny / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    model = TransformersEngine(tiny, device="cpu", settings=TransformersSettings(chat_template="instruction-response"))
    with make_task(data / "data" / "dev.json", max_new_tokens=8) as task:
        results = task.evaluate(model, ["dev-00000", "dev-00001"])
    assert [r.item_id for r in results] == ["dev-00000", "dev-00001"]
    assert [r.score for r in results] == [0.0, 0.0]
    assert {r.detail["status"] for r in results} <= {"invalid-action", "completed", "round-limit"}


def test_a_rootfs_that_cannot_be_unpacked_stops_the_run_with_its_name(data, tmp_path):
    """Every item needs the image, so a broken one is the back-end's failure, not an item's."""
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"not a tarball")
    settings = {"images": {"default": str(bad)}, "rootfs_cache": str(tmp_path / "cache")}
    with (make_task(data / "data" / "dev.json", environment=settings) as task,
          pytest.raises(BackendUnavailable, match=r"cannot unpack OS rootfs .*broken\.tar")):
        task.reference_results(["dev-00000"])
    assert not any((tmp_path / "cache").glob("broken*"))
