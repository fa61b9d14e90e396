"""Tiny random Llama models as Hugging Face dirs, built offline, for tests and benchmarks.

The tokenizer is a byte-level BPE trained here on a fixed Python/English corpus, so any text
round-trips and nothing is downloaded. Weights come from a seeded torch generator.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
    "import math\nfrom typing import List\n\nclass Solution:\n    pass\n",
    "for i in range(10):\n    if x[i] > y:\n        result.append(x[i])\n",
    "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\n",
    "Write a python function to find the minimum of a list of numbers.\n",
    "Write a function to check whether the given string is a palindrome or not.\n",
    "@@ Instruction:\n@@ Response:\n```python\n```\n",
    "Please provide a self-contained Python script that solves the following problem "
    "in a markdown code block:\n",
    "Below is a Python script with a self-contained function that solves the problem "
    "and passes corresponding tests:\n",
    "while True: print(len(str(value)), sorted(items), dict(zip(keys, values)))\n",
)

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def build_tokenizer(out_dir: str | os.PathLike, *, vocab_size: int = 384, chat_template: str | None = None):
    """Train a byte-level BPE on `CORPUS` and save it as a Hugging Face fast tokenizer in out_dir.

    Like Llama's tokenizers, it prepends BOS when asked for special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    init_std: float = 0.5,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
) -> Path:
    """Write a random LlamaForCausalLM with the tiny tokenizer to out_dir; returns the dir.

    A large `init_std` spreads the logits apart, so greedy choices are not near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * init_std)
    model.save_pretrained(out)
    return out
