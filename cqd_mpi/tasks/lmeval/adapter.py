"""The worker's live engine served to lm-eval as its `LM`, so no model is ever reloaded.

`EngineLM(engine)` implements lm-eval's three request types over the engine's capabilities
(engines/base.py): `loglikelihood` and `loglikelihood_rolling` through `LogLikelihoods`
(token ids in, summed log-probabilities out), `generate_until` through greedy generation.
Tokenization, truncation, rolling windows, stop sequences and the empty-context prefix follow
lm-eval's `HFLM` exactly (its `TemplateLM` and `utils` do the work where they can), so the
per-sample results equal HFLM's on the same model; tests/tasks/lmeval/ checks that.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from cqd_mpi.engines.base import LogLikelihoods, TextGeneration
from cqd_mpi.errors import TaskError

DEFAULT_MAX_GEN_TOKS = 256
"""HFLM's `max_gen_toks` when a task's generation_kwargs name none."""


def sampling_requested(gen_kwargs: dict[str, Any]) -> bool:
    """Whether generation kwargs ask for sampling, which CycleQD's deterministic scores refuse."""
    temperature = gen_kwargs.get("temperature", 0.0) or 0.0
    return bool(gen_kwargs.get("do_sample", False)) or float(temperature) > 0.0


class EngineLM(TemplateLM):
    """lm-eval's `LM` over a live engine: the engine's tokenizer, context length and weights."""

    backend = "causal"

    def __init__(self, engine: Any, *, name: str = "cqd_mpi"):
        super().__init__()
        if not isinstance(engine, TextGeneration):
            raise TaskError(f"lm-eval: engine {type(engine).__name__} has no text generation")
        self.engine = engine
        self.name = name
        self.tokenizer = getattr(engine, "tokenizer", None)
        if self.tokenizer is None:
            raise TaskError(f"lm-eval: engine {type(engine).__name__} exposes no tokenizer")

    # ------------------------------------------------------------ tokenization

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        scorer = self._scorer("the context length")
        return scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.name)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """HFLM's encoding: the tokenizer's special tokens unless the text already starts with BOS."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def _scorer(self, what: str) -> LogLikelihoods:
        if not isinstance(self.engine, LogLikelihoods):
            raise TaskError(f"lm-eval: {what} needs log-likelihoods, which engine "
                            f"{type(self.engine).__name__} does not provide")
        return self.engine

    # ------------------------------------------------------------ the requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scorer = self._scorer("loglikelihood requests")
        return scorer.loglikelihoods([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over HFLM's disjoint rolling windows (context length 1)."""
        scorer = self._scorer("loglikelihood_rolling requests")
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=scorer.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scorer.loglikelihoods(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations cut at the task's stop sequences and EOS, as HFLM cuts them;
        contexts keep their last max_length - max_gen_toks tokens where the engine scores."""
        groups: dict[str, list[int]] = defaultdict(list)
        kwargs_of: dict[str, dict] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups[key].append(index)
            kwargs_of[key] = request.args[1]
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = [""] * len(requests)
        for key, indices in groups.items():
            gen_kwargs = dict(kwargs_of[key])
            if sampling_requested(gen_kwargs):
                raise TaskError(f"lm-eval: generation_kwargs {gen_kwargs} ask for sampling; CycleQD scores "
                                "greedy generations only (set do_sample: false, temperature: 0)")
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            contexts = [requests[i].args[0] for i in indices]
            if isinstance(self.engine, LogLikelihoods):
                room = self.engine.max_length - max_gen_toks
                if room < 1:
                    raise TaskError(f"lm-eval: max_gen_toks {max_gen_toks} leaves no room for a context in the "
                                    f"model's {self.engine.max_length} tokens")
                ids = [self.tok_encode(context, left_truncate_len=room) for context in contexts]
                texts = self.engine.generate_ids(ids, max_new_tokens=max_gen_toks, stop=until)
            else:
                texts = self.engine.generate(contexts, max_new_tokens=max_gen_toks, stop=until)
            for index, text in zip(indices, texts):
                results[index] = postprocess_generated_text(text, until, None)
        return results

    # ----------------------------------------------------------- chat templates

    def _template(self) -> str | None:
        return getattr(self.engine, "chat_template", None) or self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The engine's chat template (the config's, else the tokenizer's), as HFLM renders it."""
        template = self._template()
        if template is None:
            raise TaskError("lm-eval: apply_chat_template is set, but the model's tokenizer has no chat "
                            "template and engine.settings.chat_template names none")
        return self.tokenizer.apply_chat_template(
            chat_history, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template() if chat_template else None
