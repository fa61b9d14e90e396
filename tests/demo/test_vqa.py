"""The VQA demo: a LLaVA expert that embeds the LLM demo's base, a manifest the textvqa task reads,
and the whole `python -m cqd_mpi demo vqa` pipeline at a small size, its Table 5 checked against
the run's report."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch

from cqd_mpi import cli
from cqd_mpi.demo import vqa as demo
from tests.demo.helpers import SMALL as SMALL_TEXT

pytestmark = pytest.mark.extra("vqa")

SMALL = demo.TrainingRecipe(text=SMALL_TEXT, vision_hidden_size=16, vision_layers=1, vision_heads=2, n_items=12,
                            batch_size=12, align_steps=4, steps=6)


@pytest.fixture(scope="module")
def small(small_llm) -> demo.DemoModels:
    """Built into the LLM demo's cache dir, so it reuses that build (as the real demo does)."""
    return demo.build(SMALL, cache_dir=small_llm.base.parent.parent)


def test_scenes_answer_their_questions():
    rng = np.random.default_rng(0)
    for _ in range(30):
        image, answers = demo.scene(rng, 32)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        colour = np.array(demo.COLOURS[answers["colour"]])
        lit = np.abs(image.astype(int) - colour).sum(axis=2) < 60
        assert 0.02 * int(answers["count"]) < lit.mean() < 0.15 * int(answers["count"]), answers
        assert answers["shape"] in demo.SHAPES


def test_the_expert_embeds_the_llm_demo_base_and_the_manifest_reads(small, small_llm, monkeypatch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from cqd_mpi.merging.embedding import VisionLayout
    from cqd_mpi.merging.modeldir import ModelDir
    from cqd_mpi.tasks.textvqa import Settings, load_items, read_image

    assert small.base == small_llm.base and {s: small.experts[s] for s in SMALL_TEXT.skills} == small_llm.experts
    model = LlavaForConditionalGeneration.from_pretrained(small.experts["vqa"])
    assert model.config.text_config.vocab_size == len(AutoProcessor.from_pretrained(small.experts["vqa"]).tokenizer) + 1
    VisionLayout(base=ModelDir(small.base), template=ModelDir(small.experts["vqa"]), mapping=None)
    items = load_items(small.vqa_data, Settings(prompt=demo.PROMPT))
    assert len(items) == SMALL.n_items and {i.question for i in items.values()} == set(demo.QUESTIONS)
    images = [read_image(item.image) for item in list(items.values())[:4]]
    processed = AutoProcessor.from_pretrained(small.experts["vqa"]).image_processor(images, return_tensors="pt")
    assert torch.allclose(demo._pixels(images), processed["pixel_values"], atol=1e-5)  # training sees what the engine feeds

    def no_training(*args, **kwargs):
        raise AssertionError("build() trained although the cache was complete")

    monkeypatch.setattr(demo, "_train_all", no_training)
    assert demo.build(SMALL, cache_dir=small_llm.base.parent.parent) == small
    assert dataclasses.replace(SMALL, steps=7).version != SMALL.version


def test_the_demo_command_runs_cycleqd_and_prints_table_5(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "build", functools.partial(demo.build, SMALL))
    run_dir = tmp_path / "vqa-demo"
    status = cli.main(["demo", "vqa", "--run-dir", str(run_dir), "--generations", "2",
                       "--cache-dir", str(small.base.parent.parent)])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads((run_dir / "final" / "report.json").read_text())
    skills = [*SMALL_TEXT.skills, "vqa"]
    assert report["tasks"] == skills and report["generations"] == 2
    lines = out.splitlines()
    table = lines[lines.index("Test-split scores of every model on every skill (Table 5)") + 1:]
    assert table[0].split() == ["model", *skills, "average"]
    models = {"base": report["base"], **{f"expert {t}": e for t, e in report["experts"].items()},
              "CycleQD aggregate": report["aggregate"]}
    for row, (label, entry) in zip(table[1:], models.items()):
        assert row.startswith(label)
        cells = row[len(label):].split()
        assert cells == [f"{entry['test_scores'][t]:.3f}" for t in skills] + [f"{entry['mean']:.3f}"], row
    claim = table[len(models) + 1]
    holds = all(report["aggregate"]["mean"] > e["mean"] for e in report["experts"].values())
    assert claim == demo.claim(report)[1] and claim.startswith(f"claim {'holds' if holds else 'does not hold'}:")
    best = max(report["experts"], key=lambda t: report["experts"][t]["mean"])
    assert f"expert {best} {report['experts'][best]['mean']:.3f}" in claim
