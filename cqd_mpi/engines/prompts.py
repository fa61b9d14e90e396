"""The text side of a generating engine: prompts to token ids and generated ids back to text.

Every text engine encodes prompts, renders chat conversations and decodes completions
through one `PromptCodec`, so that two engines given the same tokens return the same text
(the tokenizer's, from the model dir; the chat template from the config or the tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cqd_mpi.engines.templates import (
    INSTRUCTION_RESPONSE,
    TemplateError,
    render_conversation,
    resolve_template,
)
from cqd_mpi.errors import ConfigError, WeightsError

__all__ = ["PromptCodec"]


class PromptCodec:
    """The tokenizer of `model_dir` with left padding, and the chat template an engine uses.

    `chat_template` is None (the tokenizer's own), a name from engines.templates or a Jinja
    string; `where` names it in errors. `bos`: 'once' writes BOS once (the template's, else the
    tokenizer's); 'always' adds the tokenizer's BOS to a rendered chat prompt even after the
    template's, as vLLM's `generate(prompts=text)` does for the CycleQD authors (docs/protocols.md).
    """

    def __init__(self, model_dir: str | os.PathLike, *, chat_template: str | None = None,
                 where: str = "engine.settings.chat_template", bos: str = "once"):
        from transformers import AutoTokenizer

        if bos not in ("once", "always"):
            raise ConfigError(f"engine.settings.bos: expected 'once' or 'always', got {bos!r}")
        self.bos = bos
        self.model_dir = Path(model_dir)
        self.chat_template = resolve_template(chat_template, where=where)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise WeightsError(
                    f"{self.model_dir}: the tokenizer has neither a pad nor an eos token; "
                    "batched generation needs one of them for padding"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def eos_token_ids(self, generation_config) -> list[int]:
        """The ids that end a generation: the generation config's, then the tokenizer's eos."""
        ids: list[int] = []
        for source in (getattr(generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            for token_id in source if isinstance(source, (list, tuple)) else [source]:
                if token_id is not None and int(token_id) not in ids:
                    ids.append(int(token_id))
        return ids

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a plain prompt, with the tokenizer's special tokens (e.g. BOS)."""
        return self.tokenizer(prompt)["input_ids"]

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat prompt; BOS is added unless the template already wrote it
        (with `bos: always`, added in any case)."""
        bos = self.tokenizer.bos_token
        add_special_tokens = self.bos == "always" or not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_chat(self, conversation: list[dict[str, str]]) -> list[int]:
        return self.encode_rendered(self.render_chat(conversation))

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        """The prompt text of one conversation, ready for generation."""
        template = self.chat_template or self.tokenizer.chat_template
        if template is None:
            raise ConfigError(
                f"chat: the tokenizer of {self.model_dir} has no chat template; give one in the "
                f"config (engine chat_template: {INSTRUCTION_RESPONSE!r} or a Jinja string)"
            )

        def render(messages, add_generation_prompt):
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )

        try:
            return render_conversation(conversation, render)
        except TemplateError as exc:
            raise ConfigError(f"chat: {exc}") from exc

    def decode(self, generated: Sequence[Sequence[int]]) -> list[str]:
        """The text of each generated id sequence, special tokens (padding, eos) left out."""
        return self.tokenizer.batch_decode([list(ids) for ids in generated], skip_special_tokens=True)

    def stop_length(self, generated: Sequence[int], stop: Sequence[str]) -> int:
        """How many of the `generated` ids a generation keeps that ends once its decoded text
        contains a stop string: the first k whose decoding does (the transformers engine's
        criterion, replacement characters of an unfinished UTF-8 sequence included), else all."""
        stop = [s for s in stop if s]
        if not stop or not generated:
            return len(generated)
        prefixes = self.decode([generated[:k] for k in range(1, len(generated) + 1)])
        for k, text in enumerate(prefixes, start=1):
            if any(marker in text for marker in stop):
                return k
        return len(generated)
