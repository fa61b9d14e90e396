"""The merge layer on SAM's tensors (float32): 4-D convolutions, 4-D and 2-D positional
embeddings, a tied positional embedding. Crossover interpolates every tensor; the SVD mutation
acts on the 2-D matrices only; saved children load with SamModel.from_pretrained and keep
preprocessor_config.json."""

import pytest
import torch

from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.operators import aggregate_stream, crossover_stream, model_similarity
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from tests.tiny_sam import family


@pytest.fixture(scope="module")
def sams(tmp_path_factory):
    built = family(tmp_path_factory.mktemp("sam-family"))
    return {"base": ModelDir(built["base"]), **{k: ModelDir(v) for k, v in built["experts"].items()}}


def test_sam_checkpoints_hold_convolutions_and_positional_embeddings_in_float32(sams):
    base = sams["base"]
    shapes = {name: base.spec(name).shape for name in base.names}
    assert len(shapes["vision_encoder.patch_embed.projection.weight"]) == 4
    assert len(shapes["vision_encoder.neck.conv2.weight"]) == 4
    assert len(shapes["vision_encoder.pos_embed"]) == 4
    assert len(shapes["shared_image_embedding.positional_embedding"]) == 2
    assert "prompt_encoder.shared_embedding.positional_embedding" not in shapes
    assert {base.spec(n).dtype for n in base.names} == {torch.float32}


def test_crossover_with_svd_mutation_changes_2d_matrices_and_interpolates_the_rest(sams, tmp_path):
    base, p1, p2 = sams["base"], sams["polyp"], sams["skin"]
    w1, w2 = 0.7, 0.5
    spec = MutationSpec(kind="svd", rank="full", w_max=0.3)
    child = dict(crossover_stream(base=base, parent1=p1, parent2=p2, w1=w1, w2=w2, mutation=spec, seed=5))
    plain = dict(crossover_stream(base=base, parent1=p1, parent2=p2, w1=w1, w2=w2))
    c2 = w2 / (w1 + w2)
    a, b, theta = dict(p1.tensors()), dict(p2.tensors()), dict(base.tensors())
    mutated = []
    for name, tensor in child.items():
        expected = torch.lerp(a[name], b[name], c2)
        assert torch.allclose(plain[name], expected, atol=1e-6), name
        if tensor.ndim == 2 and not torch.equal(a[name], theta[name]):
            assert not torch.allclose(tensor, expected, atol=1e-6), name
            mutated.append(name)
        elif tensor.ndim != 2:
            assert torch.equal(tensor, plain[name]), name
    assert "mask_decoder.iou_prediction_head.proj_in.weight" in mutated
    assert "vision_encoder.patch_embed.projection.weight" not in mutated

    out = write_hf_dir(iter(child.items()), tmp_path / "child", like=base)
    assert (out / "preprocessor_config.json").read_text() == (base.path / "preprocessor_config.json").read_text()
    from transformers import SamModel

    loaded = SamModel.from_pretrained(out)
    state = loaded.state_dict()
    for name, tensor in child.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["prompt_encoder.shared_embedding.positional_embedding"],
                       child["shared_image_embedding.positional_embedding"])

    from cqd_mpi.engines.sam import SamEngine

    engine = SamEngine(base.path, device="cpu")
    engine.update_from_dir(out)
    assert torch.equal(engine.model.vision_encoder.pos_embed, child["vision_encoder.pos_embed"])


def test_aggregation_and_similarity_run_on_sam(sams, tmp_path):
    base = sams["base"]
    merged = dict(aggregate_stream(base=base, members=[sams["polyp"], sams["skin"]], betas=[0.5, 0.5]))
    a, b = dict(sams["polyp"].tensors()), dict(sams["skin"].tensors())
    for name, tensor in merged.items():
        assert torch.allclose(tensor, 0.5 * a[name] + 0.5 * b[name], atol=1e-6), name
    same = model_similarity(base=base, a=sams["polyp"], b=sams["polyp"])
    other = model_similarity(base=base, a=sams["polyp"], b=sams["skin"])
    assert same == pytest.approx(1.0) and 0.0 < other < 1.0
