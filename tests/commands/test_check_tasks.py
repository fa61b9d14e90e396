"""`python -m cqd_mpi check-tasks CONFIG`: the harness ceiling of every task, under each protocol."""

import os
import re
from pathlib import Path

import pytest

from cqd_mpi.tasks.base import ItemResult
from tests.conftest import write_config
from tests.runtime.helpers import run_cli
from tests.runtime.probe_task import ProbeTask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DSN = os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306")


def config_with(tiny_family, tmp_path, protocol):
    """An MBPP+ and a DB task; under `paper` the DB data is 360 entries (dev.jsonl six times, in
    place of AgentBench's standard + dev) for the authors' list, whose first four items are
    SELECT-style; under `reference` four items of every category, since AgentBench's metric
    counts a category without items as 0."""
    standard_and_dev = tmp_path / "six-devs.jsonl"
    standard_and_dev.write_text((FIXTURES / "dbbench" / "dev.jsonl").read_text() * 6)
    experts = list(tiny_family["experts"].values())
    return {
        "base": str(tiny_family["base"]),
        "experts": [{"task": "code", "path": str(experts[0])}, {"task": "db", "path": str(experts[1])}],
        "protocol": protocol,
        "tasks": [
            {"name": "code", "kind": "mbpp", "data": str(FIXTURES / "mbpp" / "MbppPlus-fixture.jsonl")},
            {"name": "db", "kind": "dbbench", "data": str(standard_and_dev if protocol == "paper" else
                                                          FIXTURES / "dbbench" / "dev.jsonl"),
             "settings": {"server": {"dsn": DSN}} if protocol == "paper" else
             {"server": {"dsn": DSN}, "item_ids": ["0", "20", "40", "41"]}},
        ],
        "qd": {"generations": 1},
        "runtime": {"run_dir": str(tmp_path / "run")},
        "engine": {"device": "cpu"},
    }


@pytest.mark.parametrize("protocol", ["paper", "reference"])
def test_check_tasks_replays_the_reference_solutions_under_each_protocol(tiny_family, tmp_path, protocol):
    path = write_config(tmp_path / "config.yaml", config_with(tiny_family, tmp_path, protocol))
    result = run_cli("check-tasks", path, "--limit", "4")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert re.search(rf"^code\s+mbpp\s+{protocol}\s+4\s+1\.000\s+0\s", result.stdout, re.M), result.stdout
    assert re.search(rf"^db\s+dbbench\s+{protocol}\s+4\s+1\.000\s+0\s", result.stdout, re.M), result.stdout
    if protocol == "paper":
        assert "MbppPlus v0.1.0 (settings.version) has 399" in result.stderr
        assert "the ids of item list 'cycleqd' are positions in" in result.stderr


class ReferenceFailsForOneItem(ProbeTask):
    """A plug-in task whose reference harness raises for its item 1, as a bad data row would."""

    def reference_results(self, item_ids):
        if f"{self.settings.salt}-1" in item_ids:
            raise ValueError("unsupported format character '%' (0x25) at index 7")
        return [ItemResult(i, 1.0) for i in item_ids]


def test_an_item_whose_reference_raises_is_its_error_not_the_commands_end(tiny_family, tmp_path):
    experts = list(tiny_family["experts"].values())
    path = write_config(tmp_path / "config.yaml", {
        "base": str(tiny_family["base"]),
        "experts": [{"task": "a", "path": str(experts[0])}, {"task": "b", "path": str(experts[1])}],
        "tasks": [{"name": name, "kind": f"{__name__}:ReferenceFailsForOneItem",
                   "settings": {"n_items": 5, "salt": name}} for name in ("a", "b")],
        "qd": {"generations": 1},
        "runtime": {"run_dir": str(tmp_path / "run")},
        "engine": {"device": "cpu"},
    })
    result = run_cli("check-tasks", path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    for name in ("a", "b"):
        assert re.search(rf"^{name}\s+\S+\s+-\s+5\s+0\.800\s+1\s", result.stdout, re.M), result.stdout
        assert f"{name}-1: score 0.00 error=exception:ValueError" in result.stdout
    assert "unsupported format character" in result.stderr and "Traceback" in result.stderr


def test_check_tasks_needs_only_the_tasks(tmp_path, capsys):
    """No base, experts, qd or runtime: check-tasks reads none of them; what is given is still
    checked, and relative data paths resolve against the config's directory."""
    from cqd_mpi.cli import main

    (tmp_path / "MbppPlus.jsonl").write_text((FIXTURES / "mbpp" / "MbppPlus-fixture.jsonl").read_text())
    config = {"tasks": [{"name": "code", "kind": "mbpp", "data": "MbppPlus.jsonl"}], "engine": {"device": "cpu"}}
    path = write_config(tmp_path / "tasks.yaml", config)
    assert main(["check-tasks", str(path), "--limit", "2"]) == 0
    assert re.search(r"^code\s+mbpp\s+paper\s+2\s+1\.000\s+0\s", capsys.readouterr().out, re.M)
    config["qd"] = {"generations": -1}
    assert main(["check-tasks", str(write_config(path, config))]) == 2
    assert "qd.generations: expected an integer >= 0, got -1" in capsys.readouterr().err
