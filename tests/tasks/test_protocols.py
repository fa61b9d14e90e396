"""Evaluation protocols: each preset reproduces its reference's prompts, items and metric.

`paper` fixtures were written from reading SakanaAI/CycleQD at 3d14971 (file and line noted
at each); `reference` ones call evalplus 0.3.1's own code where it can be imported, and were
written from reading THUDM/AgentBench at 41e6807 otherwise.
"""

import hashlib
import inspect
import json
import logging
import os
import random
from pathlib import Path

import pytest

from cqd_mpi import schema
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks import protocols
from cqd_mpi.tasks.base import ItemResult, TaskContext
from cqd_mpi.tasks.dbbench import INSTRUCTION, DBBenchTask, Episode
from cqd_mpi.tasks.mbpp import MbppPlusTask
from cqd_mpi.tasks.skills import SkillsTask
from tests.tasks.helpers import make_task as make_mbpp

REPO = Path(__file__).resolve().parents[2]
DB_FIXTURE = REPO / "tests" / "fixtures" / "dbbench" / "dev.jsonl"
DSN = os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306")

LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
"""The chat template the authors force for DB and OS (evaluation/fishfarm/fishfarm/chat_templates.py:1-13;
tasks/agentbench_db.py:91), the Llama-3-Instruct one."""


def make_db(*, protocol, data=DB_FIXTURE, **settings):
    settings.setdefault("server", {"dsn": DSN, "connect_attempts": 2, "connect_backoff_s": 0.05})
    _, settings = protocols.resolve(DBBenchTask, name=protocol, default=protocols.DEFAULT, settings=settings,
                                    where="tasks[0]")
    return DBBenchTask(name="db", data=str(data), settings=schema.build(DBBenchTask.Settings, settings, "tasks[0].settings"),
                       context=TaskContext(rank=random.randrange(1000, 10**6)))


@pytest.fixture(scope="module")
def llama3_engine(tmp_path_factory):
    """A tiny real model whose tokenizer carries the Llama-3 template (its BOS is '<s>')."""
    from cqd_mpi.engines.hf import TransformersEngine
    from cqd_mpi.engines.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("llama3") / "m", seed=5, chat_template=LLAMA3)
    return TransformersEngine(model_dir, device="cpu")


# --------------------------------------------------------------------- the tables


@pytest.mark.parametrize("table", [protocols.MBPP, protocols.DBBENCH, protocols.OS], ids=["mbpp", "dbbench", "os"])
def test_every_preset_sets_the_same_points(table):
    assert tuple(table) == protocols.PROTOCOLS
    assert set(table["paper"]) == set(table["reference"])
    assert any(table["paper"][k] != table["reference"][k] for k in table["paper"])


@pytest.mark.parametrize(("cls", "table"), [(MbppPlusTask, protocols.MBPP), (DBBenchTask, protocols.DBBENCH)])
def test_each_preset_is_a_valid_table_of_the_kinds_settings(cls, table):
    assert cls.presets is table
    for name, preset in table.items():
        settings = schema.build(cls.Settings, preset, f"{name}")
        for key, value in preset.items():
            assert getattr(settings, key) == value


def test_mbpp_defaults_are_the_default_preset():
    defaults = MbppPlusTask.Settings()
    assert {key: getattr(defaults, key) for key in protocols.MBPP[protocols.DEFAULT]} == protocols.MBPP[protocols.DEFAULT]


def test_the_reference_values_are_evalplus_0_3_1s():
    import evalplus.codegen
    from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT
    from evalplus.data.mbpp import MBPP_PLUS_VERSION
    from evalplus.eval import query_maximum_memory_bytes
    from evalplus.provider.base import DecoderBase
    from evalplus.provider.utility import EOS

    reference = protocols.MBPP["reference"]
    source = inspect.getsource(evalplus.codegen.run_codegen)
    assert f'instruction_prefix = "{protocols.EVALPLUS_INSTRUCTION_PREFIX}"' in source
    assert f'response_prefix = "{protocols.EVALPLUS_RESPONSE_PREFIX}"' in source
    assert protocols.EVALPLUS_EOS == EOS and reference["stop"] == [*EOS, "\n```\n"]
    assert reference["version"] == MBPP_PLUS_VERSION
    assert reference["min_time_limit"] == DEFAULT_MIN_TIME_LIMIT
    assert reference["gt_time_limit_factor"] == DEFAULT_GT_TIME_LIMIT_FACTOR
    assert reference["max_new_tokens"] == inspect.signature(DecoderBase).parameters["max_new_tokens"].default
    os.environ.pop("EVALPLUS_MAX_MEMORY_BYTES", None)
    assert reference["memory_mb"] << 20 == query_maximum_memory_bytes() == 4 << 30


# ------------------------------------------------------------------ resolving


def test_a_task_protocol_beats_the_run_default_and_its_settings_beat_both():
    name, settings = protocols.resolve(MbppPlusTask, name="reference", default="paper",
                                       settings={"max_new_tokens": 64}, where="tasks[0]")
    assert name == "reference"
    assert settings == {**protocols.MBPP["reference"], "max_new_tokens": 64}
    name, settings = protocols.resolve(MbppPlusTask, name=None, default="paper", settings={}, where="tasks[0]")
    assert (name, settings) == ("paper", protocols.MBPP["paper"])
    settings["stop"].append("mutated")
    assert "mutated" not in protocols.MBPP["paper"]["stop"]


def test_kinds_without_presets_ignore_the_default_and_refuse_a_protocol():
    assert protocols.resolve(SkillsTask, name=None, default="reference", settings={"n": 1}, where="tasks[1]") == (None, {"n": 1})
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.protocol: task kind 'skills' has no protocol presets, got 'paper'"):
        protocols.resolve(SkillsTask, name="paper", default="paper", settings={}, where="tasks[1]")


def test_unknown_protocols_are_named():
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.protocol: expected one of 'paper', 'reference' for task kind 'mbpp', got 'evalplus'$"):
        protocols.resolve(MbppPlusTask, name="evalplus", default="paper", settings={}, where="tasks[0]")
    with pytest.raises(ConfigError, match=r"got 'agentbench' \(the config's protocol, which this task inherits\)"):
        protocols.resolve(DBBenchTask, name=None, default="agentbench", settings={}, where="tasks[0]")
    with pytest.raises(ConfigError, match=r"^protocol: expected one of 'paper', 'reference', got 'both'"):
        protocols.check_default("both")


# --------------------------------------------------------------------- MBPP+


def test_the_reference_prompt_of_mbpp_2_is_evalplus_codegens(llama3_engine):
    """evalplus 0.3.1 codegen.py:80 and provider/utility.py:25-57 (make_raw_chat_prompt, called
    here with the same tokenizer) against the task's conversation rendered by the engine."""
    from evalplus.provider.utility import make_raw_chat_prompt

    task = make_mbpp(protocol="reference")
    problem = task.problems["Mbpp/2"]
    want = make_raw_chat_prompt(problem["prompt"].strip() + "\n", protocols.EVALPLUS_INSTRUCTION_PREFIX,
                                protocols.EVALPLUS_RESPONSE_PREFIX, llama3_engine.tokenizer)
    assert llama3_engine.render_chat(task.conversation("Mbpp/2")) == want
    assert want.startswith("<s><|start_header_id|>user<|end_header_id|>\n\nPlease provide a self-contained")
    assert want.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"
                         f"{protocols.EVALPLUS_RESPONSE_PREFIX}\n```python\n")


def test_reference_writes_bos_once_where_evalplus_0_3_1s_hf_backend_writes_it_twice(llama3_engine):
    """evalplus 0.3.1 provider/hf.py:57-67 encodes make_raw_chat_prompt's text (provider/utility.py:50-56,
    which the template begins with BOS) with tokenizer.encode, which adds BOS again. `reference`
    follows the chat-template convention instead (engines/prompts.py encode_rendered: BOS once, as
    transformers' apply_chat_template(tokenize=True) gives): the same ids less the second BOS."""
    from evalplus.provider.utility import make_raw_chat_prompt

    task = make_mbpp(protocol="reference")
    tokenizer = llama3_engine.tokenizer
    text = make_raw_chat_prompt(task.problems["Mbpp/2"]["prompt"].strip() + "\n", protocols.EVALPLUS_INSTRUCTION_PREFIX,
                                protocols.EVALPLUS_RESPONSE_PREFIX, tokenizer)
    theirs = tokenizer.encode(text)
    ours = llama3_engine.prompts.encode_chat(task.conversation("Mbpp/2"))
    bos = tokenizer.bos_token_id
    assert theirs[:2] == [bos, bos] and ours[0] == bos and ours[1] != bos
    assert ours == theirs[1:]


def test_the_paper_preset_names_its_release_and_warns_on_another(caplog, tmp_path, monkeypatch):
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    paper, reference = make_mbpp(None, protocol="paper"), make_mbpp(None, protocol="reference")
    assert paper.data_path().name == "MbppPlus-v0.1.0.jsonl" and reference.data_path().name == "MbppPlus-v0.2.0.jsonl"
    if not paper.data_path().exists():
        with pytest.raises(TaskError, match=r"get_mbpp_plus\(version=\"v0\.1\.0\"\)"):
            paper.item_ids()
    with caplog.at_level(logging.WARNING, logger="cqd_mpi.tasks"):
        make_mbpp(protocol="paper").item_ids()
    assert "holds 8 problems, but MbppPlus v0.1.0 (settings.version) has 399" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cqd_mpi.tasks"):
        make_mbpp(protocol="paper", task_ids=["Mbpp/2"]).item_ids()
    assert caplog.text == ""


# ------------------------------------------------------------------------ DB


def test_db_conversations_are_agentbenchs_and_the_authors_under_both_presets(llama3_engine):
    """AgentBench __init__.py:93-96 (its 'agent' role is the assistant) and the authors'
    tasks/agentbench_db.py:68-72 build the same three turns; the authors render them with
    their Llama-3 template and add_generation_prompt (vllm_model.py:62-67)."""
    entry = json.loads(DB_FIXTURE.read_text().splitlines()[7])
    question = f"{entry['description']}\n{entry['add_description']}"
    agentbench = [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": "Ok."},
                  {"role": "user", "content": question}]
    authors_rendered = (
        "<s><|start_header_id|>user<|end_header_id|>\n\n" + INSTRUCTION.strip() + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOk.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + question.strip() + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for protocol in protocols.PROTOCOLS:
        task = make_db(protocol=protocol, item_ids=None)
        conversation = Episode(item=task.items["7"], max_rounds=task.settings.max_rounds).history
        assert conversation == agentbench
        assert llama3_engine.render_chat(conversation) == authors_rendered


def unbalanced(task):
    """6 SELECT-style items (5 right), 2 INSERT (none right), 2 UPDATE (1 right)."""
    right = {"0", "1", "2", "3", "4", "40"}
    ids = ["0", "1", "2", "3", "4", "5", "20", "21", "40", "41"]
    return [ItemResult(item_id=i, score=1.0 if i in right else 0.0) for i in ids]


def test_the_two_db_metrics_give_their_own_values_on_an_unbalanced_set():
    """AgentBench (__init__.py:233-241): (5/6 + 0/2 + 1/2) / 3; the authors (fishfarm
    tasks/dbbench.py:284-297): 6 right of 10, every item in one of SELECT, INSERT, UPDATE."""
    reference, paper = make_db(protocol="reference"), make_db(protocol="paper", item_ids=None)
    assert reference.metric(unbalanced(reference)) == pytest.approx((5 / 6 + 0 / 2 + 1 / 2) / 3)
    assert paper.metric(unbalanced(paper)) == pytest.approx(6 / 10)


def test_an_operation_without_sql_fails_in_agentbench_and_is_read_for_its_answer_by_the_authors():
    """AgentBench __init__.py:103-107 fails the item; the authors (fishfarm tasks/dbbench.py:392-409)
    fall through to the Final Answer of the same reply."""
    reply = 'Action: Operation\nI know it already.\nFinal Answer: ["7"]'
    for protocol, status, answer in (("reference", "validation-failed", ""), ("paper", "completed", ' ["7"]')):
        task = make_db(protocol=protocol, item_ids=None)
        episode = Episode(item=task.items["0"], max_rounds=task.settings.max_rounds,
                          operation_without_sql=task.settings.operation_without_sql)
        assert episode.take_reply(reply) is None
        assert (episode.status, episode.answer) == (status, answer)


def test_the_paper_items_are_the_authors_341_of_standard_and_dev(tmp_path, caplog):
    listing = protocols.item_list("dbbench", "cycleqd")
    assert len(listing["ids"]) == 341 and listing["entries"] == 360 and len(listing["excluded"]) == 19
    assert sorted(set(listing["ids"]) | {str(i) for i in listing["excluded"]}, key=int) == [str(i) for i in range(360)]
    assert "tasks/agentbench_db.py:81" in listing["source"]
    with pytest.raises(TaskError, match=r"settings.item_ids names '60', '61', '62', '63', '64' and 276 more, but .*dev.jsonl has ids 0..59"):
        make_db(protocol="paper").item_ids()
    six = tmp_path / "six-devs.jsonl"
    six.write_text(DB_FIXTURE.read_text() * 6)
    with caplog.at_level(logging.WARNING, logger="cqd_mpi.tasks.dbbench"):
        assert make_db(protocol="paper", data=six).item_ids() == listing["ids"]
    assert f"are positions in {' or '.join(listing['data_sha256'].values())}, but {six}" in caplog.text
    assert make_db(protocol="reference", data=six).item_ids() == [str(i) for i in range(360)]


def test_the_listed_data_digests_are_those_of_the_files_named():
    """The two digests are of AgentBench's standard.jsonl + dev.jsonl and of the authors' copy
    (computed from THUDM/AgentBench@41e6807 and SakanaAI/CycleQD@3d14971); dev.jsonl, the
    part in this repository, is AgentBench's unchanged."""
    listing = protocols.item_list("dbbench", "cycleqd")
    assert len(listing["data_sha256"]) == 2
    assert hashlib.sha256(DB_FIXTURE.read_bytes()).hexdigest() == \
        "eb941c58a7a5651357b19e46aa05070f6cd5a7d83ce70cefd24aa3581e1e1130"
    with pytest.raises(ConfigError, match=r"item list 'all' of task kind 'dbbench': expected one of 'cycleqd'"):
        protocols.item_list("dbbench", "all")


# ------------------------------------------------------------------------ OS


def test_the_os_table_waits_for_the_os_task():
    paper, reference = protocols.OS["paper"], protocols.OS["reference"]
    assert (paper["max_rounds"], paper["repeats"], reference["max_rounds"], reference["repeats"]) == (5, 5, 8, 1)
    listing = protocols.item_list("os", "cycleqd")
    assert len(listing["ids"]) == len(set(listing["ids"])) == len(listing["authors_index"]) == 110
    assert listing["ids"][0] == "std-001-stock-00001" and listing["authors_index"][:3] == [1, 2, 3]
    assert all(i.startswith(("std-00", "dev-001-dev-")) for i in listing["ids"])
