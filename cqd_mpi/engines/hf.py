"""`engine.kind: transformers`: one transformers causal LM whose weights are replaced in place.

A worker builds the engine once and, for every child the conductor sends, copies the child's
tensors into the existing parameters (`load_weights`, or straight from the `mpi` transport
into `receive_buffer`), so the model is never re-created and no second full copy of the
weights is held. Generation is greedy and batched with left padding (attention masked,
positions taken from the mask), so an item's completion does not depend on which other
prompts share its batch; the tests check this bit for bit on the CPU. On a GPU, kernels
chosen per batch shape may round differently, which can flip a near-tie between two tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from cqd_mpi.engines.base import (
    ContextOverflow,
    Engine,
    LogLikelihoods,
    NamedTensors,
    TextGeneration,
    cut_at_stop,
)
from cqd_mpi.engines.devices import checkpoint_dtype, resolve_device, resolve_dtype
from cqd_mpi.engines.inplace import InPlaceWeights
from cqd_mpi.engines.prompts import PromptCodec
from cqd_mpi.engines.templates import resolve_template
from cqd_mpi.errors import ConfigError, WeightsError

__all__ = ["TransformersEngine", "TransformersSettings"]

HFLM_DEFAULT_MAX_LENGTH = 2048
"""lm-eval's HFLM's context length for a model whose config and tokenizer name none."""

TOKENIZER_UNSET = int(1e30)
"""transformers' model_max_length of a tokenizer that names no limit (VERY_LARGE_INTEGER)."""


@dataclasses.dataclass
class TransformersSettings:
    """`engine.settings` of the transformers engine.

    chat_template: None (the tokenizer's own), a name from engines.templates.CHAT_TEMPLATES
    (e.g. 'instruction-response'), or a Jinja string. batch_size: prompts generated together.
    """

    chat_template: str | None = None
    batch_size: int = 16

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected an integer >= 1, got {self.batch_size}")
        resolve_template(self.chat_template, where=f"{where}.chat_template")


def _placement(device: torch.device) -> dict:
    """Load straight onto the GPU when accelerate is there; otherwise transformers loads on the CPU first."""
    if device.type != "cuda":
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return {}
    return {"device_map": {"": device.index or 0}}


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text (not its prompt) contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :].tolist()
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersEngine(Engine, TextGeneration, LogLikelihoods):
    """One transformers causal LM and its tokenizer on this process's device, in eval mode.

    `tokens_generated` counts generated (non-padding) tokens over the model's life, for
    throughput figures.
    """

    kind = "transformers"
    Settings = TransformersSettings

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        settings: TransformersSettings | None = None,
    ):
        settings = settings or TransformersSettings()
        settings.validate("engine.settings")
        self.settings = settings
        self.batch_size = settings.batch_size
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise WeightsError(
                f"{self.model_dir}: not a Hugging Face model dir (expected config.json in it)"
            )
        self.device = resolve_device(device)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.dtype = resolve_dtype(dtype, checkpoint_dtype=checkpoint_dtype(config), device=self.device)
        self.prompts = PromptCodec(self.model_dir, chat_template=settings.chat_template)
        self.chat_template = self.prompts.chat_template
        self.tokenizer = self.prompts.tokenizer

        self.model = self.auto_class().from_pretrained(self.model_dir, dtype=self.dtype, **_placement(self.device))
        self.model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.eos_token_ids = self.prompts.eos_token_ids(self.model.generation_config)
        self.weights = InPlaceWeights(self.model, self.model_dir)
        self.tokens_generated = 0

    @staticmethod
    def auto_class():
        """The transformers auto class the model is loaded with (a subclass may load another kind)."""
        return AutoModelForCausalLM

    def __repr__(self) -> str:
        return f"TransformersEngine({str(self.model_dir)!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------ weights

    def receive_buffer(self, name: str) -> torch.Tensor:
        """The live parameter or buffer that checkpoint tensor `name` is copied into."""
        return self.weights.target(name)

    def required_names(self) -> list[str]:
        """The tensor names of the base checkpoint: what every update must include."""
        return list(self.weights.checkpoint_names)

    def load_weights(self, tensors: NamedTensors, *, strict: bool = True) -> int:
        """Copy each (name, tensor) into the live parameter of that name, in place
        (engines/inplace.py: names, casts, tied aliases, and with `strict` completeness)."""
        return self.weights.load(tensors, strict=strict)

    def finish_update(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        batch_size: int | None = None,
    ) -> list[str]:
        """Greedy completions of `prompts` (the tokenizer adds its special tokens, e.g. BOS)."""
        encoded = [self.prompts.encode(prompt) for prompt in prompts]
        return self._generate(encoded, max_new_tokens, stop, batch_size)

    def chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        batch_size: int | None = None,
    ) -> list[str]:
        """Greedy replies to `conversations` rendered with the chat template.

        A conversation that ends with an assistant message is continued: its reply is what
        follows that message's text (a response prefix, as evalplus's codegen prompts do).
        """
        encoded = [self.prompts.encode_chat(conversation) for conversation in conversations]
        return self._generate(encoded, max_new_tokens, stop, batch_size)

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        """The prompt text of one conversation, ready for generation."""
        return self.prompts.render_chat(conversation)

    def _generate(
        self,
        encoded: list[list[int]],
        max_new_tokens: int,
        stop: Sequence[str],
        batch_size: int | None,
    ) -> list[str]:
        if max_new_tokens < 1:
            raise ConfigError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        batch_size = batch_size or self.batch_size
        if not encoded:
            return []
        context = self.context_length
        completions: list[str] = [""] * len(encoded)
        fitting = []
        for index, ids in enumerate(encoded):
            if context is not None and len(ids) >= context:
                completions[index] = ContextOverflow(prompt_tokens=len(ids), context_length=context)
            else:
                fitting.append(index)
        order = sorted(fitting, key=lambda i: len(encoded[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rooms = [max_new_tokens if context is None else min(max_new_tokens, context - len(encoded[i]))
                     for i in chunk]
            texts = self._generate_batch([encoded[i] for i in chunk], max(rooms), stop, rooms)
            for index, text in zip(chunk, texts):
                completions[index] = text
        return completions

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens, read as lm-eval's HFLM reads it: n_positions,
        max_position_embeddings or n_ctx of its (text) config, else the tokenizer's
        model_max_length; None if neither names one. Generation (ContextOverflow) and scoring
        (`max_length`) both use it."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit is not None and limit != TOKENIZER_UNSET else None

    @torch.inference_mode()
    def _generate_batch(self, token_ids: list[list[int]], max_new_tokens: int, stop: Sequence[str],
                        rooms: Sequence[int] | None = None) -> list[str]:
        """Greedy completions of one padded batch; row i keeps at most rooms[i] new tokens (what
        fits in the context: greedy decoding is causal, so the cut equals a shorter generation)."""
        batch = self.tokenizer.pad({"input_ids": token_ids}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        prompt_length = input_ids.shape[1]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids or None,
        )
        criteria = StoppingCriteriaList()
        if any(stop):
            criteria.append(_StopOnStrings(self.tokenizer, stop, prompt_length))
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=criteria,
        )
        new_tokens = output[:, prompt_length:]
        self.tokens_generated += int((new_tokens != self.tokenizer.pad_token_id).sum())
        rows = new_tokens.tolist()
        if rooms is not None:
            rows = [row[:room] for row, room in zip(rows, rooms)]
        texts = self.prompts.decode(rows)
        return [cut_at_stop(text, stop) for text in texts]

    # ------------------------------------------------------------------ scoring

    @property
    def max_length(self) -> int:
        """The context length scoring reads (LogLikelihoods): `context_length`, else HFLM's
        default when the model names none."""
        return self.context_length or HFLM_DEFAULT_MAX_LENGTH

    def generate_ids(self, token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                     stop: Sequence[str] = (), batch_size: int | None = None) -> list[str]:
        """Greedy completions of prompts given as token ids."""
        return self._generate([list(ids) for ids in token_ids], max_new_tokens, stop, batch_size)

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                       batch_size: int | None = None) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation, per
        pair; longest first in batches, right-padded (causal attention never sees the padding),
        log-softmax in float32."""
        batch_size = batch_size or self.batch_size
        inputs = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("loglikelihoods: expected a non-empty context and continuation")
            inputs.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            scored = self._score_batch([inputs[i] for i in chunk], [list(pairs[i][1]) for i in chunk])
            for index, result in zip(chunk, scored):
                results[index] = result
        return results

    @torch.inference_mode()
    def _score_batch(self, inputs: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        width = max(len(ids) for ids in inputs)
        batch = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = self.model(batch.to(self.device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        results = []
        for row, (ids, continuation) in enumerate(zip(inputs, continuations)):
            selected = logprobs[row, len(ids) - len(continuation) : len(ids)]
            target = torch.tensor(continuation, dtype=torch.long, device=selected.device)
            greedy = bool((selected.argmax(dim=-1) == target).all())
            results.append((float(selected.gather(1, target[:, None]).sum()), greedy))
        return results
