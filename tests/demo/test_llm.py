"""The demo builder: loadable HF dirs, byte-identical rebuilds, a cache that is never half-used."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from cqd_mpi import locations
from cqd_mpi.demo import llm as demo
from cqd_mpi.run import config as run_config
from cqd_mpi.tasks import skills
from tests.conftest import subprocess_env
from tests.demo.helpers import SMALL, digests


@pytest.fixture(scope="module")
def small(small_llm) -> demo.DemoModels:
    return small_llm


def test_models_load_with_transformers(small):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert small.base.parent.name == f"demo-{SMALL.version}"
    for path in (small.base, *small.experts.values()):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tokenizer("reverse:abc=")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("reverse:abc=")
        assert tokenizer.decode(ids, skip_special_tokens=True) == "reverse:abc="
        assert model.config.vocab_size == len(tokenizer)
        assert model.config.eos_token_id == tokenizer.eos_token_id
        logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_experts_are_small_steps_from_the_base(small):
    from safetensors.torch import load_file

    base = load_file(small.base / "model.safetensors")
    for path in small.experts.values():
        expert = load_file(path / "model.safetensors")
        assert expert.keys() == base.keys()
        delta = sum(float((expert[k] - base[k]).norm() ** 2) for k in base) ** 0.5
        size = sum(float(base[k].norm() ** 2) for k in base) ** 0.5
        assert 0 < delta < 0.2 * size


def test_rebuild_writes_the_same_bytes(small, tmp_path):
    again = demo.build(SMALL, cache_dir=tmp_path)
    assert digests(again.base.parent) == digests(small.base.parent)


def test_cached_models_are_reused_without_training(small, monkeypatch):
    before = digests(small.base.parent)

    def no_training(*args, **kwargs):
        raise AssertionError("build() trained although the cache was complete")

    monkeypatch.setattr(demo, "_train_all", no_training)
    again = demo.build(SMALL, cache_dir=small.base.parent.parent)
    assert again == small
    assert digests(again.base.parent) == before


def test_a_changed_recipe_gets_its_own_dir():
    assert demo.TrainingRecipe(expert_lr=2e-4).version != demo.TrainingRecipe().version
    assert demo.TrainingRecipe().version == demo.TrainingRecipe().version


def test_an_incomplete_cache_is_rebuilt(small, tmp_path):
    first = demo.build(SMALL, cache_dir=tmp_path)
    expected = digests(first.base.parent)
    (first.experts["shift"] / "model.safetensors").unlink()
    rebuilt = demo.build(SMALL, cache_dir=tmp_path)
    assert digests(rebuilt.base.parent) == expected


def test_a_build_killed_midway_is_not_reused(tmp_path):
    endless = dataclasses.replace(SMALL, expert_steps=100_000)
    code = ("from cqd_mpi.demo import llm as demo; from tests.demo.helpers import SMALL; import dataclasses; "
            f"demo.build(dataclasses.replace(SMALL, expert_steps=100_000), cache_dir={str(tmp_path)!r})")
    process = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env())
    work = tmp_path / f".demo-{endless.version}.tmp-{process.pid}"
    deadline = time.monotonic() + 120
    while not (work / "base" / "model.safetensors").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the build never saved its base"
        time.sleep(0.05)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert work.is_dir() and not (tmp_path / f"demo-{endless.version}").exists()
    assert not demo._complete(work, endless)

    demo.build(SMALL, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-{SMALL.version}"]


@pytest.mark.slow
def test_concurrent_builds_share_one_complete_cache(small, tmp_path):
    code = f"from cqd_mpi.demo import llm as demo; from tests.demo.helpers import SMALL; demo.build(SMALL, cache_dir={str(tmp_path)!r})"
    processes = [subprocess.Popen([sys.executable, "-c", code], env=subprocess_env()) for _ in range(2)]
    assert [p.wait() for p in processes] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-{SMALL.version}"]
    assert digests(tmp_path / f"demo-{SMALL.version}") == digests(small.base.parent)


def test_leftovers_of_dead_builds_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".demo-{SMALL.version}.tmp-{dead.pid}"
    (leftover / "base").mkdir(parents=True)
    demo.build(SMALL, cache_dir=tmp_path)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-{SMALL.version}"]


def test_cache_root_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert locations.cache_root() == tmp_path / "cqd_mpi"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert locations.cache_root() == Path(os.path.expanduser("~")) / ".cache" / "cqd_mpi"


def test_training_batches_follow_the_mix_and_skip_held_out_items():
    recipe = demo.TrainingRecipe(n_items=200, min_length=1, max_length=3, batch_size=64)
    held_out = demo._held_out(recipe)
    assert len(held_out) == 3 * 200
    batches = demo._batches(recipe, weights={"reverse": 2, "sort": 1, "shift": 1}, seed=0, held_out=held_out)
    seen = [pair for _, batch in zip(range(20), batches) for pair in batch]
    assert not {question for question, _ in seen} & held_out
    counts = Counter(question.partition(":")[0] for question, _ in seen)
    assert counts == {"reverse": 640, "sort": 320, "shift": 320}
    assert all(skills.SKILLS[q.partition(":")[0]].solve(q.partition(":")[2][:-1]) == a for q, a in seen)


def test_demo_config_is_a_valid_run_config(small, tmp_path):
    data = demo.demo_config(small, run_dir=tmp_path / "run", seed=3, generations=7)
    config = run_config.from_dict(data, root=tmp_path)
    assert config.task_names == list(SMALL.skills)
    assert config.base == str(small.base)
    assert {e.task: e.path for e in config.experts} == {s: str(p) for s, p in small.experts.items()}
    assert config.qd.generations == 7 and config.runtime.seed == 3
    settings = run_config.task_settings(config.tasks[1])
    assert settings == skills.Settings(skill="sort", n_items=24, min_length=3, max_length=6, seed=0)


def test_write_config_writes_the_demo_config_with_the_command_line_and_runs_nothing(small, tmp_path, monkeypatch):
    """`demo --write-config PATH --generations N --test-every M --seed S`: the config `trials` and
    `run` take (docs/comparisons.md's experiment), with no run dir made."""
    from cqd_mpi.cli import main

    monkeypatch.setattr(demo, "build", lambda cache_dir=None: small)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--write-config", "exp/config.yaml", "--generations", "9", "--test-every", "3",
                 "--seed", "2", "--run-dir", "exp/run"]) == 0
    config = run_config.load(tmp_path / "exp" / "config.yaml")
    assert (config.qd.generations, config.runtime.test_every, config.runtime.seed) == (9, 3, 2)
    assert config.runtime.run_dir == str(tmp_path / "exp" / "run") and config.task_names == list(SMALL.skills)
    assert not (tmp_path / "exp" / "run").exists()
