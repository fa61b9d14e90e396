"""SamEngine: masks at each image's size for box, point and no prompts; in-place weight swaps;
the mask-prediction capability; saved SAM dirs it refuses, naming the file."""

import numpy as np
import pytest
import torch

from cqd_mpi.engines import capabilities, create, engine_class
from cqd_mpi.engines.base import MaskPrompt
from cqd_mpi.engines.sam import SamEngine, SamSettings
from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.merging.weights import ModelDir
from tests.tiny_sam import family, scene


@pytest.fixture(scope="module")
def sams(tmp_path_factory):
    return family(tmp_path_factory.mktemp("sam-family"))


@pytest.fixture(scope="module")
def live(sams):
    return SamEngine(sams["base"], device="cpu")


def images_and_prompts(n=6):
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(n):
        image, mask = scene(rng, (64, 48 + 8 * i))
        ys, xs = np.nonzero(mask)
        kind = i % 3
        if kind == 0:
            prompts.append(MaskPrompt(box=(xs.min(), ys.min(), xs.max(), ys.max())))
        elif kind == 1:
            prompts.append(MaskPrompt(points=((float(xs.mean()), float(ys.mean())),), labels=(1,)))
        else:
            prompts.append(MaskPrompt())
        images.append(image)
    return images, prompts


def test_sam_is_a_built_in_engine_with_the_mask_prediction_capability():
    assert engine_class("sam") is SamEngine
    assert capabilities(SamEngine) == ["mask prediction"]
    with pytest.raises(ConfigError, match=r"engine.settings.batch_size: expected an integer >= 1, got 0"):
        create("sam", "unused", settings={"batch_size": 0})


def test_masks_come_back_at_each_images_size_whatever_the_batching(live):
    images, prompts = images_and_prompts()
    before = live.images_seen
    batched = live.predict_masks(images, prompts)
    assert live.images_seen - before == len(images)
    for image, predicted in zip(images, batched):
        assert predicted.mask.shape == image.shape[:2] and predicted.mask.dtype == np.bool_
        assert isinstance(predicted.iou, float)
    one_by_one = [live.predict_masks([i], [p])[0] for i, p in zip(images, prompts)]
    for a, b in zip(batched, one_by_one):
        assert np.array_equal(a.mask, b.mask)
        assert a.iou == pytest.approx(b.iou, abs=1e-5)
    assert len({m.mask.tobytes() for m in batched}) == len(images)


def test_prompts_change_the_mask(live):
    images, _ = images_and_prompts(1)
    boxes = [MaskPrompt(box=(2, 2, 20, 20)), MaskPrompt(box=(30, 30, 60, 60)), MaskPrompt()]
    masks = live.predict_masks(images * 3, boxes)
    assert len({m.mask.tobytes() for m in masks}) == 3


def test_in_place_weights_predict_like_a_fresh_load(sams):
    images, prompts = images_and_prompts()
    expert = SamEngine(sams["experts"]["polyp"], device="cpu").predict_masks(images, prompts)
    live = SamEngine(sams["base"], device="cpu")
    before = live.predict_masks(images, prompts)
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(before, expert))
    storage = {name: p.data_ptr() for name, p in live.model.named_parameters()}
    count = live.update(ModelDir(sams["experts"]["polyp"]).tensors())
    assert count == len(ModelDir(sams["base"]).names)
    assert storage == {name: p.data_ptr() for name, p in live.model.named_parameters()}
    after = live.predict_masks(images, prompts)
    for a, b in zip(after, expert):
        assert np.array_equal(a.mask, b.mask) and a.iou == b.iou
    name = "vision_encoder.patch_embed.projection.weight"
    assert live.receive_buffer(name).data_ptr() == live.model.vision_encoder.patch_embed.projection.weight.data_ptr()


def test_tied_positional_embedding_and_incomplete_streams_are_refused(sams, live):
    tensors = dict(ModelDir(sams["base"]).tensors())
    assert "prompt_encoder.shared_embedding.positional_embedding" not in tensors
    tied = dict(tensors)
    tied["prompt_encoder.shared_embedding.positional_embedding"] = tensors[
        "shared_image_embedding.positional_embedding"] + 1
    with pytest.raises(WeightsError, match=r"is tied to 'shared_image_embedding.positional_embedding'"):
        live.load_weights(tied.items())
    partial = {k: v for k, v in tensors.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    with pytest.raises(WeightsError, match=r"left 6 tensor\(s\) of the live model unset: mask_decoder.iou_pred"):
        live.load_weights(partial.items())
    wrong = {"vision_encoder.pos_embed": torch.zeros(1, 4, 4, 32)}
    with pytest.raises(WeightsError, match=r"'vision_encoder.pos_embed': expected shape \(1, 8, 8, 32\)"):
        live.load_weights(wrong.items(), strict=False)
    live.update(tensors.items())


def test_a_dir_without_the_image_processor_or_of_another_model_is_refused(sams, tmp_path, tiny_dirs):
    import shutil

    copy = tmp_path / "no-processor"
    shutil.copytree(sams["base"], copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match=r"no-processor: not a SAM model dir \(expected preprocessor_config.json"):
        SamEngine(copy, device="cpu")
    llama = tmp_path / "llama"
    shutil.copytree(tiny_dirs["a"], llama)
    shutil.copy(sams["base"] / "preprocessor_config.json", llama)
    with pytest.raises(WeightsError, match=r"llama/config.json: expected model_type 'sam'"):
        SamEngine(llama, device="cpu")


def test_multimask_output_keeps_the_mask_with_the_highest_predicted_iou(sams):
    images, prompts = images_and_prompts(3)
    engine = SamEngine(sams["base"], device="cpu", settings=SamSettings(multimask_output=True, batch_size=2))
    chosen = engine.predict_masks(images, prompts)
    with torch.inference_mode():
        inputs = engine.processor(images=images[:1], input_data_format="channels_last", return_tensors="pt",
                                  input_boxes=[[list(map(float, prompts[0].box))]])
        output = engine.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                              multimask_output=True)
    assert output.iou_scores.shape[-1] == 3
    assert chosen[0].iou == pytest.approx(float(output.iou_scores[0, 0].max()), abs=1e-6)
