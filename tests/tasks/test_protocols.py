"""Evaluation protocols: each preset reproduces its reference's prompts, items and metric.

`paper` fixtures were written from reading SakanaAI/CycleQD at 3d14971 (file and line noted
at each); `reference` ones call evalplus 0.3.1's own code where it can be imported, and were
written from reading THUDM/AgentBench at 41e6807 otherwise.
"""

import inspect
import logging
import os
from pathlib import Path

import pytest

from cqd_mpi import schema
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.tasks import protocols
from cqd_mpi.tasks.mbpp import MbppPlusTask
from cqd_mpi.tasks.skills import SkillsTask
from tests.tasks.test_mbpp import make_task as make_mbpp

REPO = Path(__file__).resolve().parents[2]

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


@pytest.mark.parametrize(("cls", "table"), [(MbppPlusTask, protocols.MBPP)])
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
        protocols.resolve(MbppPlusTask, name=None, default="agentbench", settings={}, where="tasks[0]")
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
