"""`engine.kind: sam`: one Segment Anything model whose weights are replaced in place.

The model is transformers' `SamModel` read from a Hugging Face dir (config.json, safetensors,
and the image processor's preprocessor_config.json); images are prepared by the PIL image
processor (`SamImageProcessorPil`, so torchvision is not needed). A worker builds the engine
once and copies each child's tensors into the live parameters (engines/inplace.py), as the
transformers engine does. Prediction is batched: prompts of one kind (box, points, none)
and point count go through the model together, `batch_size` images at a time.

`sam_config` and `save_model` build small SAMs from a config (tests, the SAM demo, the
benchmarks); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cqd_mpi.engines.base import Engine, MaskPrediction, MaskPrompt, NamedTensors, PredictedMask
from cqd_mpi.engines.devices import checkpoint_dtype, resolve_device, resolve_dtype
from cqd_mpi.engines.inplace import InPlaceWeights
from cqd_mpi.errors import ConfigError, WeightsError, require

__all__ = ["SamEngine", "SamSettings", "image_processor", "sam_config", "save_model"]

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclasses.dataclass
class SamSettings:
    """`engine.settings` of the SAM engine.

    batch_size: images through the model together. multimask_output: let the decoder propose
    three masks and keep the one with the highest predicted IoU (SAM's choice for ambiguous
    single-point prompts) instead of its single-mask output. mask_threshold: logit above
    which a pixel is on the object.
    """

    batch_size: int = 8
    multimask_output: bool = False
    mask_threshold: float = 0.0

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected an integer >= 1, got {self.batch_size}")


def sam_config(*, image_size: int = 64, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2,
               num_heads: int = 2, output_channels: int = 32, window_size: int = 4,
               global_attn_indexes: Sequence[int] = (1,), decoder_hidden_size: int | None = None,
               decoder_mlp_dim: int = 64, decoder_heads: int = 2):
    """A SamConfig with a small vision encoder (a few thousand to a few million parameters)."""
    from transformers import SamConfig

    decoder = decoder_hidden_size or output_channels
    return SamConfig(
        vision_config=dict(hidden_size=hidden_size, output_channels=output_channels, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size,
                           window_size=window_size, global_attn_indexes=list(global_attn_indexes),
                           mlp_dim=4 * hidden_size, num_pos_feats=decoder // 2),
        prompt_encoder_config=dict(hidden_size=decoder, image_size=image_size, patch_size=patch_size,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=decoder, mlp_dim=decoder_mlp_dim, num_hidden_layers=2,
                                 num_attention_heads=decoder_heads, iou_head_hidden_dim=decoder),
    )


def image_processor(image_size: int):
    """SAM's image processor for `image_size` inputs (longest edge resized to it, padded square)."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    mask = image_size // 4
    return SamImageProcessorPil(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                                mask_size={"longest_edge": mask}, mask_pad_size={"height": mask, "width": mask})


def save_model(model, out_dir: str | os.PathLike) -> Path:
    """Write `model` (a SamModel) and its image processor's preprocessor_config.json to out_dir."""
    out = Path(out_dir)
    model.save_pretrained(out)
    image_processor(model.config.vision_config.image_size).save_pretrained(out)
    return out


class SamEngine(Engine, MaskPrediction):
    """One SamModel and its image processor on this process's device, in eval mode.

    `images_seen` counts images predicted over the engine's life, for throughput figures.
    """

    kind = "sam"
    Settings = SamSettings

    def __init__(self, model_dir: str | os.PathLike, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", settings: SamSettings | None = None):
        require("PIL", extra="sam", feature="the sam engine's image processor")
        from transformers import SamConfig, SamModel, SamProcessor
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        self.settings = settings or SamSettings()
        self.settings.validate("engine.settings")
        self.model_dir = Path(model_dir)
        for name in ("config.json", PREPROCESSOR_CONFIG):
            if not (self.model_dir / name).is_file():
                raise WeightsError(f"{self.model_dir}: not a SAM model dir (expected {name} in it)")
        config = SamConfig.from_pretrained(self.model_dir)
        if config.model_type != "sam":
            raise WeightsError(f"{self.model_dir / 'config.json'}: expected model_type 'sam' for engine kind "
                               f"'sam', got {config.model_type!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, checkpoint_dtype=checkpoint_dtype(config), device=self.device)
        self.processor = SamProcessor(image_processor=SamImageProcessorPil.from_pretrained(self.model_dir))
        self.model = SamModel.from_pretrained(self.model_dir, dtype=self.dtype)
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.weights = InPlaceWeights(self.model, self.model_dir)
        self.images_seen = 0

    def __repr__(self) -> str:
        return f"SamEngine({str(self.model_dir)!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------ weights

    def receive_buffer(self, name: str) -> torch.Tensor:
        return self.weights.target(name)

    def required_names(self) -> list[str]:
        return list(self.weights.checkpoint_names)

    def load_weights(self, tensors: NamedTensors, *, strict: bool = True) -> int:
        return self.weights.load(tensors, strict=strict)

    def finish_update(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- prediction

    def predict_masks(self, images: Sequence[np.ndarray], prompts: Sequence[MaskPrompt]) -> list[PredictedMask]:
        """One binary mask per (image, prompt), at the image's size, with the predicted IoU."""
        if len(images) != len(prompts):
            raise ValueError(f"predict_masks: expected one prompt per image, got {len(images)} images "
                             f"and {len(prompts)} prompts")
        groups: dict[tuple[str, int], list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault((prompt.kind, len(prompt.points)), []).append(index)
        results: list[PredictedMask | None] = [None] * len(images)
        size = self.settings.batch_size
        for indices in groups.values():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                masks = self._predict_batch([images[i] for i in chunk], [prompts[i] for i in chunk])
                for index, mask in zip(chunk, masks):
                    results[index] = mask
        return results

    @torch.inference_mode()
    def _predict_batch(self, images: list[np.ndarray], prompts: list[MaskPrompt]) -> list[PredictedMask]:
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"predict_masks: expected uint8 RGB images [height, width, 3], "
                                 f"got {image.dtype} {tuple(image.shape)}")
        first = prompts[0]
        prompt_inputs = {}
        if first.box is not None:
            prompt_inputs["input_boxes"] = [[list(map(float, p.box))] for p in prompts]
        if first.points:
            prompt_inputs["input_points"] = [[[list(map(float, xy)) for xy in p.points]] for p in prompts]
            prompt_inputs["input_labels"] = [[list(p.labels)] for p in prompts]
        inputs = self.processor(images=list(images), input_data_format="channels_last", return_tensors="pt",
                                **prompt_inputs)
        model_inputs = {key: inputs[key].to(self.device) for key in ("input_boxes", "input_points", "input_labels")
                        if key in inputs}
        output = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                            multimask_output=self.settings.multimask_output, **model_inputs)
        scores = output.iou_scores[:, 0].float()
        best = scores.argmax(dim=-1)
        rows = torch.arange(len(images), device=scores.device)
        chosen = output.pred_masks[:, 0][rows, best].unsqueeze(1).unsqueeze(1).float()
        masks = self.processor.post_process_masks(chosen.cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"],
                                                  mask_threshold=self.settings.mask_threshold, binarize=True)
        self.images_seen += len(images)
        ious = scores[rows, best].cpu().tolist()
        return [PredictedMask(mask=mask[0, 0].numpy(), iou=float(iou)) for mask, iou in zip(masks, ious)]
