"""LlavaEngine: image questions answered greedily and batch-invariantly, text generation on its
language model, weights replaced in place (a lifted text model answers as if loaded fresh)."""

import numpy as np
import pytest

from cqd_mpi import engines
from cqd_mpi.engines.base import VisualQuestionAnswering
from cqd_mpi.engines.llava import LlavaEngine
from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.embedding import VisionLayout
from cqd_mpi.merging.weights import ModelDir
from tests.vqa_data import COLOURS

pytest.importorskip("PIL", reason="pip install 'cqd_mpi[vqa]'")

QUESTIONS = ["abc", "what colour", "x", "is it red", "q"]


def images():
    shapes = [(20, 24), (16, 16), (30, 18), (24, 24), (17, 33)]
    return [np.full((h, w, 3), COLOURS[c], dtype=np.uint8) for (h, w), c in zip(shapes, [*COLOURS, "red"])]


@pytest.fixture(scope="module")
def engine(vl_family):
    return engines.create("llava", vl_family["experts"]["vqa"], device="cpu",
                          settings={"batch_size": 4, "image_batch_size": 3})


def test_kind_and_capabilities(engine):
    assert isinstance(engine, LlavaEngine) and isinstance(engine, VisualQuestionAnswering)
    assert set(engines.capabilities(engine)) == {"visual question answering", "text generation", "log-likelihoods"}
    with pytest.raises(ConfigError, match="image_batch_size: expected an integer >= 1"):
        engines.create("llava", engine.model_dir, device="cpu", settings={"image_batch_size": 0})


def test_answers_do_not_depend_on_the_batch(engine):
    batched = engine.answer(images(), QUESTIONS, max_new_tokens=4)
    alone = [engine.answer([image], [question], max_new_tokens=4)[0] for image, question in zip(images(), QUESTIONS)]
    assert batched == alone and len(batched) == 5
    assert engine.render_question("abc") == "<image>abc="
    assert engine.generate(["abc", "de"], max_new_tokens=3) == [engine.generate([p], max_new_tokens=3)[0]
                                                               for p in ("abc", "de")]


def test_update_in_place_equals_a_fresh_engine(engine, vl_family, tmp_path):
    layout = VisionLayout(base=ModelDir(vl_family["base"]), template=ModelDir(vl_family["experts"]["vqa"]))
    lifted = layout.write_lifted(vl_family["experts"]["alpha"], tmp_path / "alpha")
    before = engine.answer(images(), QUESTIONS, max_new_tokens=4), engine.generate(QUESTIONS, max_new_tokens=4)
    storage = {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    engine.update_from_dir(lifted)
    after = engine.answer(images(), QUESTIONS, max_new_tokens=4), engine.generate(QUESTIONS, max_new_tokens=4)
    assert storage == {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    fresh = LlavaEngine(lifted, device="cpu")
    assert after == (fresh.answer(images(), QUESTIONS, max_new_tokens=4), fresh.generate(QUESTIONS, max_new_tokens=4))
    assert after != before
    engine.update_from_dir(vl_family["experts"]["vqa"])
    assert engine.answer(images(), QUESTIONS, max_new_tokens=4) == before[0]


def test_llava_next_answers_and_takes_a_lifted_text_model(vl_family, tmp_path):
    """LLaVA-NeXT (any-resolution tiles, `image_newline`, carried like the rest of the vision stack)."""
    from tests.tiny_llava import save_tiny_llava

    next_dir = save_tiny_llava(tmp_path / "next", language_model=vl_family["base"], seed=5, noise=0.2, next_=True)
    live = engines.create("llava", next_dir, device="cpu", settings={"image_batch_size": 2})
    assert type(live.model).__name__ == "LlavaNextForConditionalGeneration"
    layout = VisionLayout(base=ModelDir(vl_family["base"]), template=ModelDir(next_dir))
    assert "image_newline" in layout.carried
    batched = live.answer(images(), QUESTIONS, max_new_tokens=3)
    assert batched == [live.answer([i], [q], max_new_tokens=3)[0] for i, q in zip(images(), QUESTIONS)]
    lifted = layout.write_lifted(vl_family["base"], tmp_path / "base")
    live.update_from_dir(lifted)
    assert live.answer(images(), QUESTIONS, max_new_tokens=3) == LlavaEngine(lifted, device="cpu").answer(
        images(), QUESTIONS, max_new_tokens=3)
