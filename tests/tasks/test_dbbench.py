"""AgentBench's DB task: its protocol, metric and isolation, with scripted policies on a real server.

The policies below stand in for a model (they answer `chat` like TransformersEngine does); the MySQL
server is always real: CQD_TEST_MYSQL_DSN, default mysql://root@127.0.0.1:3306. The data is
AgentBench's dbbench dev.jsonl (tests/fixtures/dbbench/dev.jsonl, unchanged): items 0-19 are
SELECT-style, 20-39 INSERT, 40-59 UPDATE.
"""

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqd_mpi import schema
from cqd_mpi.errors import BackendUnavailable, ConfigError, TaskError
from cqd_mpi.tasks import task_class
from cqd_mpi.tasks.base import ItemResult, TaskContext
from cqd_mpi.tasks.dbbench import (
    ACKNOWLEDGEMENT,
    INSTRUCTION,
    DBBenchTask,
    Episode,
    Settings,
    answer_matches,
    category_accuracy,
    load_items,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "dbbench" / "dev.jsonl"
DSN = os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306")
SELECTS, INSERTS, UPDATES = [str(i) for i in range(20)], [str(i) for i in range(20, 40)], [str(i) for i in range(40, 60)]


def make_task(data=FIXTURE, *, rank=None, **settings):
    settings.setdefault("server", {"dsn": DSN, "connect_attempts": 2, "connect_backoff_s": 0.05})
    settings.setdefault("statement_seconds", 1.0)
    rank = random.randrange(1000, 10**6) if rank is None else rank
    return DBBenchTask(name="db", data=str(data), settings=schema.build(Settings, settings, "tasks[0].settings"),
                       context=TaskContext(rank=rank))


def leftovers(task) -> list:
    pattern = f"cqd\\_r{task.context.rank}\\_%"
    with task.server.admin() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s", (pattern,))
        found = list(cursor.fetchall())
        cursor.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (pattern,))
        return found + list(cursor.fetchall())


class Policy:
    """A scripted stand-in for a model: one reply per conversation, chosen from the item it asks about."""

    def __init__(self, task):
        self.by_question = {item.question: item for item in task.items.values()}
        self.batches = []
        self.conversations = {}

    def chat(self, conversations, *, max_new_tokens, stop=()):
        assert max_new_tokens == 512
        self.batches.append(len(conversations))
        replies = []
        for conversation in conversations:
            item = self.by_question[conversation[2]["content"]]
            self.conversations[item.item_id] = conversation
            operations = sum(1 for m in conversation[3:] if m["role"] == "assistant")
            replies.append(self.reply(item, operations, conversation))
        return replies


def operate(sql: str) -> str:
    return f"I will run a statement.\nAction: Operation\n```sql\n{sql}\n```\n"


def answer(values) -> str:
    return f"That settles it.\nAction: Answer\nFinal Answer: {json.dumps(values)}"


class LabelPolicy(Policy):
    """Executes the label's statements, then answers; SELECT-style items answer their label at once."""

    def reply(self, item, operations, conversation):
        if item.modifies and operations < len(item.label):
            return operate(item.label[operations])
        return answer([] if item.modifies else list(item.label))


class WrongPolicy(Policy):
    def reply(self, item, operations, conversation):
        if item.modifies and operations == 0:
            column = item.table.columns[0]
            return operate(f"UPDATE `{item.table.name}` SET `{column}` = 'wrong'")
        return answer(["definitely wrong"])


HOSTILE = [
    "DROP DATABASE mysql",
    "SELECT SLEEP(1000)",
    "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(1000)",
    "SELECT COUNT(*) FROM information_schema.tables a, information_schema.tables b, information_schema.tables c, "
    "information_schema.columns d",
    "GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER",
    "SHUTDOWN",
    "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
    "SELECT 1; DROP TABLE t",
    "SELECT user, authentication_string FROM mysql.user",
    "SELECT schema_name FROM information_schema.schemata",
]


class HostilePolicy(LabelPolicy):
    """Items in `hostile` run one hostile statement, then give up; the others play as LabelPolicy."""

    def __init__(self, task, hostile):
        super().__init__(task)
        self.hostile = hostile

    def reply(self, item, operations, conversation):
        if item.item_id not in self.hostile:
            return super().reply(item, operations, conversation)
        if operations == 0:
            return operate(self.hostile[item.item_id])
        return answer(["gave up"])


# ----------------------------------------------------------------------- data


def test_the_agentbench_sample_loads_with_its_categories():
    items = load_items(FIXTURE)
    assert [i.item_id for i in items] == [str(n) for n in range(60)]
    assert [i.category for i in items] == ["SELECT"] * 20 + ["INSERT"] * 20 + ["UPDATE"] * 20
    first = items[0]
    assert first.table.name == "US Ambassadors and Envoy Extraordinary to Colombia"
    assert first.label == ("March 19, 1998",) and first.answer_md5 is None
    assert items[20].answer_md5 == "[('09aa8fbf72f39362970f95a1276b957c',)]"
    assert first.question.startswith("What is the Presentation of Credentials") and "\nThe name of this table is" in first.question


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("add_description"), r"line 1: missing key 'add_description'"),
    (lambda e: e["table"]["table_info"].pop("rows"), r"line 1: missing key 'table.table_info.rows'"),
    (lambda e: e.update(type="SELECT"), r"line 1: key 'type' should be list, got str"),
    (lambda e: e["table"]["table_info"]["rows"][0].pop(), r"rows\[0\] should be a list of 5 cells"),
    (lambda e: e["table"]["table_info"]["rows"][0].__setitem__(0, {"a": 1}), r"rows\[0\]: expected a string, number or null, got dict"),
    (lambda e: e.pop("label"), r"missing key 'label' \(the answer list of a other item\)"),
    (lambda e: e.update(type=["UPDATE"]), r"line 1: missing key 'answer_md5'"),
])
def test_bad_entries_are_reported_with_line_and_key(tmp_path, change, message):
    entry = json.loads(FIXTURE.read_text().splitlines()[0])
    change(entry)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(TaskError, match=message):
        load_items(path)


def test_unreadable_files_and_ids_are_reported(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(TaskError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_items(tmp_path / "broken.jsonl")
    with pytest.raises(TaskError, match="does not exist"):
        make_task(tmp_path / "missing.jsonl").item_ids()
    with pytest.raises(TaskError, match=r"settings\.item_ids names '99'"):
        make_task(item_ids=["1", "99"]).item_ids()
    with pytest.raises(TaskError, match=r"unknown item id '77'"), make_task(item_ids=["1"]) as task:
        task.evaluate(LabelPolicy(task), ["77"])


def test_settings_are_typed_and_checked():
    assert task_class("dbbench") is DBBenchTask
    settings = schema.build(Settings, {"server": {"backend": "local"}, "max_rounds": 3}, "tasks[0].settings")
    assert settings.server.backend == "local" and settings.max_rounds == 3
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.settings\.server: unknown key 'hots'"):
        schema.build(Settings, {"server": {"hots": "x"}}, "tasks[0].settings")
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.settings\.max_rounds: expected an integer >= 1, got 0"):
        schema.build(Settings, {"max_rounds": 0}, "tasks[0].settings")


# ------------------------------------------------------------------- protocol


def episode(item_id="0", max_rounds=5):
    return Episode(item=load_items(FIXTURE)[int(item_id)], max_rounds=max_rounds)


def test_the_conversation_opens_as_agentbench_v02_does():
    opening = episode().history
    assert [m["role"] for m in opening] == ["user", "assistant", "user"]
    assert opening[0]["content"] == INSTRUCTION and opening[1]["content"] == ACKNOWLEDGEMENT == "Ok."
    assert INSTRUCTION.startswith("\nI will ask you a question") and INSTRUCTION.endswith("deal with it by yourself.\n")
    assert "Final Answer: [\"ANSWER1\", \"ANSWER2\", ...]" in INSTRUCTION


def test_replies_are_parsed_as_agentbench_v02_parses_them():
    run = episode()
    assert run.take_reply("Action: Operation\n```sql\nSELECT a\nFROM t;\n```\n```sql\nDROP TABLE t\n```") == "SELECT a FROM t;"
    run.take_observation("[]")
    assert run.take_reply("Action: Answer\nFinal Answer: [\"x\"]") is None
    assert (run.status, run.answer, run.rounds) == ("completed", ' ["x"]', 1)

    cases = {
        "The answer is 7.": "validation-failed",
        "Action: Operation\nSELECT 1": "validation-failed",
        "Action: Operation\n```sql SELECT 1```": "validation-failed",
        "Final Answer: [\"7\"]": "validation-failed",
        "Action: Answer\nFinal Answer: [\"7\"]": "completed",
        "Let me answer.\nFinal Answer: 7": "completed",
        "Action: Operation": "validation-failed",
    }
    for reply, status in cases.items():
        run = episode()
        assert run.take_reply(reply) is None
        assert run.status == status, reply


def test_round_limit_follows_agentbench_v02():
    run = episode(max_rounds=2)
    for _ in range(2):
        assert run.take_reply("Action: Operation\n```sql\nSELECT 1\n```") == "SELECT 1"
        run.take_observation("[(1,)]")
    assert run.take_reply("Action: Operation\n```sql\nSELECT 1\n```") is None
    assert (run.status, run.rounds) == ("round-limit", 2)
    run = episode(max_rounds=1)
    run.take_reply("Action: Operation\n```sql\nSELECT 1\n```")
    run.take_observation("[(1,)]")
    run.take_reply("Action: Answer\nFinal Answer: [\"1\"]")
    assert (run.status, run.answer) == ("completed", ' ["1"]')


def test_answers_are_compared_as_agentbench_v02_compares_them():
    assert answer_matches(' ["1"]', ["1.0"])
    assert answer_matches(" [2011]", ["2011.0"])
    assert answer_matches(' "5.00"', ["5.0"]) is False
    assert answer_matches(" 5", ["5.0"])
    assert answer_matches(' ["1\u20130", "2\u20130"]', ["2\u20130", "1\u20130"])
    assert not answer_matches(' ["1\u20130"]', ["2\u20130", "1\u20130"])
    assert answer_matches(' ["Giza"]', ["Giza"]) and not answer_matches(' ["giza"]', ["Giza"])
    assert answer_matches(" Giza", ["Giza"]) is False
    assert answer_matches(" [None]", ["none"]) is False
    assert answer_matches(" __import__('os').system('true')", ["0"]) is False
    assert answer_matches(" [[1], [2]]", ["1", "2"]) is False
    assert answer_matches(" [1e999]", ["inf"])


def test_the_metric_is_agentbench_overall_category_accuracy():
    scored = [("SELECT", 1.0), ("SELECT", 0.0), ("SELECT", 1.0), ("SELECT", 0.0), ("INSERT", 1.0), ("INSERT", 0.0),
              ("UPDATE", 0.0)]
    assert category_accuracy(scored) == {"SELECT": 0.5, "INSERT": 0.5, "UPDATE": 0.0, "overall": pytest.approx(1 / 3)}
    assert category_accuracy([("SELECT", 1.0)])["overall"] == pytest.approx(1 / 3)
    with make_task() as task:
        results = [ItemResult(item_id=i, score=1.0) for i in ("0", "1", "20")] + [ItemResult(item_id="40", score=0.0)]
        assert task.metric(results) == pytest.approx((1 + 1 + 0) / 3)


# ------------------------------------------------------ the harness, end to end


@pytest.mark.slow
def test_reference_ceiling_is_100_percent_on_the_agentbench_sample():
    with make_task(statement_seconds=10.0) as task:
        results = task.reference_results(task.item_ids())
        assert [r.score for r in results] == [1.0] * 60
        assert task.metric(results) == 1.0
        refused = results[5]
        assert "Incorrect column name ''" in refused.detail["message"]
        assert results[20].detail["rounds"] == 1 and results[20].detail["status"] == "completed"
        assert leftovers(task) == []


def test_label_policy_scores_everything_round_by_round():
    ids = ["0", "7", "20", "45"]
    with make_task() as task:
        policy = LabelPolicy(task)
        results = task.evaluate(policy, ids)
        assert [r.item_id for r in results] == ids
        assert [r.score for r in results] == [1.0] * 4 and all(r.error is None for r in results)
        assert policy.batches == [4, 2]
        insert = policy.conversations["20"]
        assert insert[3]["content"].startswith("I will run a statement.\nAction: Operation\n```sql\nINSERT INTO")
        assert insert[4] == {"role": "user", "content": "[]"}
        assert results[2].detail["sql"] == [task.items["20"].label[0].replace("\n", " ")]
        assert leftovers(task) == []


def test_observations_come_back_as_the_next_user_turn(tmp_path):
    table = {"table_name": "scores", "table_info": {"columns": [{"name": "who", "type": "TEXT"}, {"name": "points", "type": "INT"}],
                                                    "rows": [["ann", 3], ["bob", 5], ["cy", None]]}}
    entry = {"description": "How many points did bob score?", "add_description": "The table is scores.",
             "type": ["other"], "label": ["5"], "table": table}
    data = tmp_path / "mini.jsonl"
    data.write_text(json.dumps(entry) + "\n")

    class Querying(Policy):
        def reply(self, item, operations, conversation):
            if operations == 0:
                return operate("SELECT points\nFROM scores WHERE who = 'bob'")
            rows = ast.literal_eval(conversation[-1]["content"])
            return answer([rows[0][0]])

    with make_task(data) as task:
        policy = Querying(task)
        [result] = task.evaluate(policy, ["0"])
        assert policy.conversations["0"][4] == {"role": "user", "content": "[('5',)]"}
        assert result.score == 1.0 and result.detail["answer"] == ' ["5"]'


def test_wrong_sql_and_wrong_answers_score_zero():
    with make_task() as task:
        results = task.evaluate(WrongPolicy(task), ["3", "25", "50"])
        assert [(r.score, r.error) for r in results] == [(0.0, "wrong-answer")] * 3
        assert results[2].detail["answer"].startswith("[('") and results[2].detail["answer"] != task.items["50"].answer_md5


def test_malformed_replies_fail_their_item_only():
    class Malformed(LabelPolicy):
        def reply(self, item, operations, conversation):
            if item.item_id == "1":
                return "The answer is Checco D'Angelo."
            if item.item_id == "41":
                return "Action: Operation\nUPDATE t SET x = 1"
            return super().reply(item, operations, conversation)

    with make_task() as task:
        results = task.evaluate(Malformed(task), ["0", "1", "41", "42"])
        assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, "parse"), (0.0, "parse"), (1.0, None)]
        assert results[1].detail["status"] == "validation-failed"


def test_too_many_rounds_end_the_item_after_max_rounds_executions():
    class Endless(LabelPolicy):
        def reply(self, item, operations, conversation):
            return operate(item.label[0] if item.modifies else "SELECT 1")

    with make_task(max_rounds=3) as task:
        policy = Endless(task)
        results = task.evaluate(policy, ["2", "44"])
        assert policy.batches == [2, 2, 2, 2]
        assert [r.detail["rounds"] for r in results] == [3, 3]
        assert [r.detail["status"] for r in results] == ["round-limit", "round-limit"]
        # AgentBench scores a modifying item by its table whatever the final status: the
        # label UPDATE applied three times leaves the expected table.
        assert [r.score for r in results] == [0.0, 1.0]


def test_hostile_sql_fails_its_item_only_and_the_server_stays_healthy():
    hostile = {str(20 + n): sql for n, sql in enumerate(HOSTILE)}
    honest = ["0", "7", "40", "41"]
    with make_task(statement_seconds=1.0, parallel=4) as task:
        started = time.monotonic()
        results = task.evaluate(HostilePolicy(task, hostile), [*hostile, *honest])
        assert time.monotonic() - started < 20
        scores = {r.item_id: r.score for r in results}
        assert all(scores[i] == 0.0 for i in hostile) and all(scores[i] == 1.0 for i in honest)
        observations = {r.item_id: r for r in results}
        assert observations["21"].error == "wrong-answer"
        with task.server.admin() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM mysql.user WHERE user = 'root'")
            assert cursor.fetchone()[0] >= 1
        assert leftovers(task) == []
        again = task.evaluate(LabelPolicy(task), ["8"])
        assert again[0].score == 1.0


def test_only_the_first_sql_block_runs_and_other_databases_stay_out_of_reach(tmp_path):
    class Prying(LabelPolicy):
        def reply(self, item, operations, conversation):
            if item.item_id != "40":
                return super().reply(item, operations, conversation)
            if operations == 0:
                return (operate("SELECT schema_name FROM information_schema.schemata") +
                        "\n```sql\nDELETE FROM `Football Team Results`\n```")
            return super().reply(item, operations - 1, conversation)

    with make_task() as task:
        policy = Prying(task)
        results = task.evaluate(policy, ["40", "41"])
        seen = ast.literal_eval(policy.conversations["40"][4]["content"])
        assert len(seen) == 2 and ("information_schema",) in seen
        assert [r.score for r in results] == [1.0, 1.0]


def test_a_model_that_returns_the_wrong_number_of_replies_is_an_error():
    class Short(LabelPolicy):
        def chat(self, conversations, *, max_new_tokens, stop=()):
            return super().chat(conversations, max_new_tokens=max_new_tokens, stop=stop)[:-1]

    with make_task() as task:
        with pytest.raises(TaskError, match="returned 1 replies for 2 conversations"):
            task.evaluate(Short(task), ["0", "1"])
        assert leftovers(task) == []


def row_hash(rows) -> str:
    """AgentBench's answer_md5 of a table, computed here the way its SQL computes it."""
    import hashlib

    hashes = sorted(hashlib.md5(",".join(v for v in row if v is not None).encode()).hexdigest()[:5] for row in rows)
    return f"[('{hashlib.md5(','.join(hashes).encode()).hexdigest()}',)]"


def test_items_with_percent_signs_in_their_names_are_scored_not_crashed(tmp_path):
    """AgentBench's standard.jsonl has columns named '%', 'Win %' and 'Foreign nationals in %'."""
    columns = [{"name": "Team", "type": "TEXT"}, {"name": "Win %", "type": "TEXT"}, {"name": "%", "type": "TEXT"}]
    rows = [["ann", "50%", "3"], ["bob", "25%", "1"]]
    table = {"table_name": "Results 100%", "table_info": {"columns": columns, "rows": rows}}
    select = {"description": "What is ann's Win %?", "add_description": "", "type": ["other"], "label": ["50%"],
              "table": table}
    insert = {"description": "Add cy with 10% and 0.", "add_description": "", "type": ["INSERT"], "table": table,
              "label": ["INSERT INTO `Results 100%` (`Team`, `Win %`, `%`) VALUES ('cy', '10%', '0')"],
              "answer_md5": row_hash([*rows, ["cy", "10%", "0"]])}
    data = tmp_path / "percent.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in (select, insert)) + "\n")
    with make_task(data) as task:
        results = task.reference_results(["0", "1"])
        assert [(r.score, r.error) for r in results] == [(1.0, None), (1.0, None)]
        assert "message" not in results[0].detail
        assert leftovers(task) == []


def test_an_exception_in_one_item_is_that_items_error_and_the_batch_goes_on(caplog):
    class Surrogate(LabelPolicy):
        def reply(self, item, operations, conversation):
            if item.item_id == "3" and operations == 0:
                return operate("SELECT '\ud800'")
            return super().reply(item, operations, conversation)

    with make_task() as task, caplog.at_level("ERROR", logger="cqd_mpi.tasks.multiturn"):
        results = task.evaluate(Surrogate(task), ["2", "3", "21", "41"])
        assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, "action"), (1.0, None), (1.0, None)]
        assert results[1].detail["status"] == "action-error"
        assert results[1].detail["message"].startswith("UnicodeEncodeError:")
        failure = [r for r in caplog.records if "item 3 failed in its action" in r.getMessage()]
        assert failure and failure[0].exc_info is not None
        assert leftovers(task) == []


REVEALING = [
    "SELECT DATABASE(), CURRENT_USER()",
    "SELECT * FROM missing_table",
    "SHOW TABLES",
    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
    "USE mysql",
    "DROP DATABASE information_schema",
]


def test_what_the_model_reads_is_the_same_on_every_rank():
    """Two workers (different ranks, hence different database names and random bits) play the
    same items: every observation matches byte for byte."""

    class Revealing(LabelPolicy):
        def reply(self, item, operations, conversation):
            if operations < len(REVEALING):
                return operate(REVEALING[operations])
            return super().reply(item, operations - len(REVEALING), conversation)

    ids = ["0", "5", "20", "41"]
    histories = []
    for rank in (1, 2):
        with make_task(rank=random.randrange(1000, 10**6) * 10 + rank, max_rounds=8) as task:
            policy = Revealing(task)
            results = task.evaluate(policy, ids)
            assert [r.score for r in results] == [1.0] * 4
            histories.append({i: policy.conversations[i] for i in ids})
    assert histories[0] == histories[1]
    first = histories[0]["0"]
    assert first[4]["content"] == "[('US Ambassadors and Envoy Extraordinary to Colombia', " \
        "'US Ambassadors and Envoy Extraordinary to Colombia@%')]"
    assert not any("cqd_" in m["content"] for h in histories for c in h.values() for m in c)


# ----------------------------------------------------------------- back-ends


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_is_down_fails_with_the_backend_named():
    port = free_port()
    with make_task(server={"port": port, "connect_attempts": 2, "connect_backoff_s": 0.05}) as task:
        with pytest.raises(BackendUnavailable, match=rf"MySQL back-end 'external' at root@127\.0\.0\.1:{port} is unreachable after 2 attempts"):
            task.evaluate(LabelPolicy(task), ["0"])
        [data, server] = task.check_backends()
        assert data.ok and "60 items" in data.message
        assert not server.ok and f"127.0.0.1:{port}" in server.message


def test_check_backends_reports_the_reachable_server():
    with make_task() as task:
        [data, server] = task.check_backends()
        assert data.ok and server.ok and server.name == "mysql (external)"
        assert "MariaDB" in server.message or "MySQL" in server.message.upper()


def running(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


@pytest.mark.slow
def test_local_backend_end_to_end_and_a_server_dying_mid_run():
    with make_task(server={"backend": "local", "connect_attempts": 2, "connect_backoff_s": 0.05}) as task:
        results = task.reference_results(["0", "20", "40"])
        assert [r.score for r in results] == [1.0, 1.0, 1.0]
        pid = task.server.pid

        class Killer(LabelPolicy):
            def reply(self, item, operations, conversation):
                if operations == 1:
                    os.kill(pid, signal.SIGKILL)
                    while running(pid):
                        time.sleep(0.05)
                return super().reply(item, operations, conversation)

        with pytest.raises(BackendUnavailable, match="MySQL back-end 'local' at root@unix:"):
            task.evaluate(Killer(task), ["21"])


@pytest.mark.docker
@pytest.mark.slow
def test_docker_backend_end_to_end():
    docker_host = os.environ.get("DOCKER_HOST", "unix:///tmp/podman.sock")
    with make_task(server={"backend": "docker", "docker_host": docker_host}) as task:
        results = task.reference_results(["0", "4", "20", "40"])
        assert [r.score for r in results] == [1.0] * 4
        assert task.server.flavor == "mariadb" and task.server.address.port != 3306


WORKER = """
import json, sys
from cqd_mpi import schema
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.dbbench import DBBenchTask, Settings
rank, ids = int(sys.argv[1]), sys.argv[2].split(",")
settings = schema.build(Settings, {"server": {"dsn": sys.argv[3]}}, "settings")
with DBBenchTask(name="db", data=sys.argv[4], settings=settings, context=TaskContext(rank=rank, world_size=4)) as task:
    results = task.reference_results(ids)
    print(json.dumps({"metric": task.metric(results), "scores": [r.score for r in results]}))
"""


@pytest.mark.slow
def test_several_worker_processes_share_one_server():
    base = random.randrange(1000, 10**5) * 10
    ids = ",".join([*SELECTS[:4], *INSERTS[:4], *UPDATES[:4]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(base + r), ids, DSN, str(FIXTURE)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(4)]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["metric"] == 1.0 and report["scores"] == [1.0] * 12
    with make_task(rank=base) as task:
        for r in range(4):
            task.context = TaskContext(rank=base + r)
            assert leftovers(task) == []


@pytest.mark.slow
def test_a_tiny_transformers_llama_runs_through_the_task(tmp_path):
    from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
    from cqd_mpi.engines.tiny import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)
    config = json.loads((tiny / "config.json").read_text())  # AgentBench's prompt is over 1024 tiny tokens
    (tiny / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    model = TransformersEngine(tiny, device="cpu", settings=TransformersSettings(chat_template="instruction-response"))
    with make_task(max_new_tokens=8) as task:
        results = task.evaluate(model, ["0", "20", "40"])
        assert [r.item_id for r in results] == ["0", "20", "40"]
        assert [r.score for r in results] == [0.0, 0.0, 0.0]
        assert {r.detail["status"] for r in results} <= {"validation-failed", "completed", "round-limit"}
        assert all(r.detail["last_reply"] for r in results)
        assert task.metric(results) == 0.0
        assert leftovers(task) == []
