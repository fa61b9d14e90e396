"""`engine.kind: llava`: a transformers image-text-to-text model (LLaVA, LLaVA-NeXT) updated in place.

The transformers engine's text generation, on the vision-language model's language model
(prompts without images), so MBPP+, DB and OS run on it unchanged, plus visual question
answering: each image and question rendered by the processor's chat template (a user turn
with the image, then the question), batched with left padding, answered greedily. Weights
are replaced in place per child as in engines/hf.py (the checkpoint's own names, the vision
tower and projector included).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from cqd_mpi.engines.base import VisualQuestionAnswering, cut_at_stop
from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
from cqd_mpi.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import numpy as np


@dataclasses.dataclass
class LlavaSettings(TransformersSettings):
    """`engine.settings` of the llava engine: the transformers engine's, and the batch size of
    image questions (each image adds its vision tokens to the sequence)."""

    image_batch_size: int = 8

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.image_batch_size < 1:
            raise ConfigError(f"{where}.image_batch_size: expected an integer >= 1, got {self.image_batch_size}")


class LlavaEngine(TransformersEngine, VisualQuestionAnswering):
    """A LLaVA-style model and its processor on this process's device, in eval mode."""

    kind = "llava"
    Settings = LlavaSettings

    def __init__(self, model_dir: str | os.PathLike, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", settings: LlavaSettings | None = None):
        super().__init__(model_dir, device=device, dtype=dtype, settings=settings or LlavaSettings())
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{self.model_dir}: the vision-language model's processor cannot be loaded "
                               f"({type(exc).__name__}: {exc}); keep its processor and chat template files in the "
                               "directory") from None
        self.processor.tokenizer = self.tokenizer
        if getattr(self.processor, "chat_template", None) is None:
            raise WeightsError(f"{self.model_dir}: the processor has no chat template (chat_template.jinja or "
                               "chat_template.json); image questions are rendered with it")

    @staticmethod
    def auto_class():
        return AutoModelForImageTextToText

    def __repr__(self) -> str:
        return f"LlavaEngine({str(self.model_dir)!r}, device={str(self.device)!r}, dtype={self.dtype})"

    def render_question(self, question: str) -> str:
        """The prompt text of one image question: a user turn holding the image, then the question."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int,
               stop: Sequence[str] = ()) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"answer: expected one question per image, got {len(images)} images and "
                             f"{len(questions)} questions")
        if max_new_tokens < 1:
            raise ConfigError(f"answer: max_new_tokens must be >= 1, got {max_new_tokens}")
        size = self.settings.image_batch_size
        answers: list[str] = []
        for start in range(0, len(images), size):
            answers.extend(self._answer_batch(list(images[start:start + size]),
                                              [self.render_question(q) for q in questions[start:start + size]],
                                              max_new_tokens, stop))
        return answers

    @torch.inference_mode()
    def _answer_batch(self, images: list, prompts: list[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_ids or None)
        output = self.model.generate(**inputs, generation_config=config)
        new_tokens = output[:, prompt_length:]
        self.tokens_generated += int((new_tokens != self.tokenizer.pad_token_id).sum())
        return [cut_at_stop(text, stop) for text in self.prompts.decode(new_tokens.tolist())]
