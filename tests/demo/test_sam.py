"""The SAM demo: loadable SAM dirs and Kvasir-layout datasets, byte-identical rebuilds, a reused
cache, and the whole `python -m cqd_mpi demo sam` pipeline at a small size."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

from cqd_mpi import cli
from cqd_mpi.demo import sam as demo
from tests.demo.helpers import digests

SMALL = demo.TrainingRecipe(hidden_size=32, num_heads=2, decoder_hidden_size=16, n_items=8, batch_size=8,
                            base_steps=12, expert_steps=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> demo.DemoModels:
    return demo.build(SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def test_scenes_of_each_domain_are_images_with_a_non_empty_mask():
    rng = np.random.default_rng(0)
    for domain, scene in demo.DOMAINS.items():
        image, mask = scene(rng, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8, domain
        assert mask.shape == (64, 64) and 0.03 < mask.mean() < 0.6, domain


def test_models_load_and_datasets_read_as_kvasir_layout(small):
    from transformers import SamModel

    from cqd_mpi.tasks.segmentation import Settings, load_items

    assert small.base.parent.name == f"sam-demo-{SMALL.version}"
    for path in (small.base, *small.experts.values()):
        model = SamModel.from_pretrained(path)
        assert model.config.vision_config.image_size == SMALL.image_size
        assert (path / "preprocessor_config.json").is_file()
    for domain, data in small.datasets.items():
        items = load_items(data, Settings(prompt="point"))
        assert len(items) == SMALL.n_items and all(i.item_id.startswith(domain) for i in items.values())


def test_rebuild_writes_the_same_bytes_and_a_complete_cache_is_reused(small, tmp_path, monkeypatch):
    again = demo.build(SMALL, cache_dir=tmp_path)
    assert digests(again.base.parent) == digests(small.base.parent)

    def no_training(*args, **kwargs):
        raise AssertionError("build() trained although the cache was complete")

    monkeypatch.setattr(demo, "_train_all", no_training)
    assert demo.build(SMALL, cache_dir=tmp_path) == again
    assert demo.TrainingRecipe(expert_lr=1e-4).version != demo.TrainingRecipe().version
    with pytest.raises(ValueError, match=r"one base_mix weight"):
        dataclasses.replace(SMALL, base_mix=(1, 1))


def test_the_demo_command_runs_cycleqd_and_prints_table_4(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "build", functools.partial(demo.build, SMALL))
    run_dir = tmp_path / "sam-demo"
    status = cli.main(["demo", "sam", "--run-dir", str(run_dir), "--generations", "3",
                       "--cache-dir", str(small.base.parent.parent)])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads((run_dir / "final" / "report.json").read_text())
    assert report["tasks"] == list(SMALL.experts) and report["generations"] == 3
    assert "Test-split scores normalised by each task's expert (Table 4)" in out
    from cqd_mpi.merging.operators import model_similarity
    from cqd_mpi.merging.weights import ModelDir

    similarity = model_similarity(base=ModelDir(small.base), a=ModelDir(small.experts["polyps"]),
                                  b=ModelDir(small.experts["camouflage"]))
    assert f"model similarity of experts polyps and camouflage: {similarity:.4f}" in out
    line = next(line for line in out.splitlines() if line.startswith("claim "))
    from cqd_mpi.analysis.normalised import claim

    assert line == claim(report)[1]
    lines = out.splitlines()
    table = lines[lines.index("Test-split scores normalised by each task's expert (Table 4)"):]
    for column, domain in enumerate(SMALL.experts, start=2):
        row = next(line.split() for line in table if line.startswith(f"expert {domain}"))
        own = report["experts"][domain]["test_scores"][domain]
        assert row[column] == ("1.000" if own > 0 else "-"), (row, own)
    from cqd_mpi.analysis.runstate import RunState, summary

    assert "Test-split scores normalised by each task's expert" in summary(RunState.load(run_dir))
