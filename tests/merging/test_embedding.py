"""Experts that embed the base: the name mapping (derived for both LLaVA layouts, or given), the
language model seen in the base's names, children completed with the template's vision stack
and extra rows, and the refusal of a vision-language model whose language model is not the base."""

import pytest
import torch

from cqd_mpi.errors import WeightsError
from cqd_mpi.merging import operators
from cqd_mpi.merging.builder import ModelBuilder
from cqd_mpi.merging.embedding import LanguageModelView, VisionLayout, derive
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from cqd_mpi.qd.records import ModelRecipe
from tests.tiny_llama import VOCAB, state_dict
from tests.tiny_llava import EXTRA_ROWS, save_tiny_llava


@pytest.fixture(scope="module")
def layout(vl_family):
    return VisionLayout(base=ModelDir(vl_family["base"]), template=ModelDir(vl_family["experts"]["vqa"]))


def test_mapping_is_derived_for_both_llava_layouts(vl_family, layout):
    base = ModelDir(vl_family["base"]).names
    # transformers saves LLaVA as llava-hf checkpoints ship: language_model.model.*, language_model.lm_head.*
    assert layout.names.as_config() == {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
    # the layout transformers >= 4.52 uses live: model.language_model.*, lm_head.*, model.vision_tower.*
    renamed = [{"language_model.lm_head.weight": "lm_head.weight"}.get(n, n) for n in ModelDir(
        vl_family["experts"]["vqa"]).names]
    renamed = ["model." + n.replace("language_model.model.", "language_model.") if not n.startswith("lm_head")
               else n for n in renamed]
    derived = derive(base, renamed)
    assert derived.as_config() == {"model.language_model.": "model.", "lm_head.": "lm_head."}
    assert derived.to_base("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight") is None
    assert derived.to_vl("model.layers.1.mlp.up_proj.weight") == "model.language_model.layers.1.mlp.up_proj.weight"
    assert sorted(layout.extended.values()) == [VOCAB, VOCAB]
    assert layout.carried and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in layout.carried)


def test_view_is_the_language_model_in_the_base_names(vl_family, layout):
    vl = state_dict(vl_family["experts"]["vqa"])
    view = layout.view(vl_family["experts"]["vqa"])
    assert isinstance(view, LanguageModelView)
    assert view.layout() == ModelDir(vl_family["base"]).layout()
    seen = dict(view.tensors())
    assert torch.equal(seen["model.embed_tokens.weight"], vl["language_model.model.embed_tokens.weight"][:VOCAB])
    assert torch.equal(seen["lm_head.weight"], vl["language_model.lm_head.weight"][:VOCAB])
    assert torch.equal(seen["model.layers.1.mlp.up_proj.weight"], vl["language_model.model.layers.1.mlp.up_proj.weight"])


def test_children_merge_the_language_model_and_carry_the_rest(vl_family, layout, tmp_path):
    """A vision run's child is the text-only merge of the language models (same operators, same
    seed), completed with the template's extra rows and vision stack, and loads as a LLaVA."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    family = vl_family
    lifted = layout.write_lifted(family["base"], tmp_path / "lifted-base")
    mutation = MutationSpec(kind="svd", rank=4, w_max=0.3)
    builder = ModelBuilder(base_path=lifted, expert_paths=[family["experts"][n] for n in ("alpha", "vqa")],
                           model_path={0: lifted, 1: family["experts"]["alpha"], 2: family["experts"]["vqa"]}.get,
                           mutation=mutation, vision=layout, basis_cache=tmp_path / "basis")
    builder.check()
    recipe = ModelRecipe(kind="crossover", parents=(1, 2), weights=(0.6, 0.9), mutation_seed=11, active_task=0)
    child = builder.write(5, recipe, tmp_path / "child")
    text_only = write_hf_dir(operators.crossover_stream(
        base=ModelDir(family["base"]), parent1=ModelDir(family["experts"]["alpha"]),
        parent2=layout.view(family["experts"]["vqa"]), w1=0.6, w2=0.9, mutation=mutation, seed=11),
        tmp_path / "text-only", like=ModelDir(family["base"]))
    got, text, template = state_dict(child), state_dict(text_only), state_dict(family["experts"]["vqa"])
    assert set(got) == set(template)
    for name, tensor in got.items():
        base_name = layout.names.to_base(name)
        if base_name is None:
            assert torch.equal(tensor, template[name]), name
        elif name in layout.extended:
            assert torch.equal(tensor[:VOCAB], text[base_name]) and torch.equal(tensor[VOCAB:], template[name][VOCAB:])
            assert tensor.shape[0] == VOCAB + EXTRA_ROWS
        else:
            assert torch.equal(tensor, text[base_name]), name
    assert {p.name for p in child.iterdir()} >= {"processor_config.json", "chat_template.jinja", "tokenizer.json"}
    model = LlavaForConditionalGeneration.from_pretrained(child)
    processor = AutoProcessor.from_pretrained(child)
    import numpy as np

    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                            "text": "abc"}]}], add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize(("change", "named"), [
    ({"hidden_size": 48}, "language_model.lm_head.weight"),
    ({"num_hidden_layers": 3}, "language_model.model.layers.2."),
])
def test_a_language_model_that_is_not_the_base_is_refused_naming_the_tensor(vl_family, tmp_path, change, named):
    other = save_tiny_llava(tmp_path / "other", language_model=None, seed=1, **change)
    with pytest.raises(WeightsError, match=r"is not the base's: its tensor '" + named.replace(".", r"\.")):
        VisionLayout(base=ModelDir(vl_family["base"]), template=ModelDir(other))
    with pytest.raises(WeightsError, match="has no counterpart"):
        VisionLayout(base=ModelDir(vl_family["base"]), template=ModelDir(other), mapping={"nowhere.": "model.", "lm_head.": "lm_head."})
