"""A tiny LLaVA built from a config (no downloads) whose language model is the tiny Llama's.

Its language model has the base's architecture with `EXTRA_ROWS` more vocabulary rows (the
image token sits in the first of them), a 1-layer CLIP vision tower and LLaVA's projector;
`save_tiny_llava` writes the model, the tokenizer (with `<image>`), the processor and a chat
template, as llava-hf checkpoints ship.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_llama import VOCAB, tiny_config

EXTRA_ROWS = 2
IMAGE_TOKEN = VOCAB
IMAGE_SIZE = 16
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                 "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}")


def save_tokenizer(path: Path):
    """The tiny Llama's character tokenizer, plus `<image>` at id IMAGE_TOKEN (an extra row)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)},
             "<image>": IMAGE_TOKEN}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=["<image>"])
    fast.save_pretrained(path)
    return fast


GRID = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]


def llava_config(*, next_: bool = False, **text):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=16)
    options = dict(vision_config=vision, text_config=tiny_config(vocab_size=VOCAB + EXTRA_ROWS, **text),
                   image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                   vision_feature_select_strategy="default", tie_word_embeddings=False)
    return LlavaNextConfig(image_grid_pinpoints=GRID, **options) if next_ else LlavaConfig(**options)


def save_tiny_llava(path: Path, *, language_model: Path | None, seed: int, noise: float = 0.02,
                    next_: bool = False, **text) -> Path:
    """A tiny LLaVA (LLaVA-NeXT with `next_`, its `image_newline` and any-resolution tiles); with
    `language_model`, its LM is that tiny Llama's weights plus seeded noise (the shared rows;
    the extra rows and the vision stack are random)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration)(
        llava_config(next_=next_, **text))
    if language_model is not None:
        from tests.tiny_llama import state_dict

        source = state_dict(language_model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            lm = model.model.language_model
            for name, param in [*(("model." + n, p) for n, p in lm.named_parameters()),
                                ("lm_head.weight", model.lm_head.weight)]:
                ref = source[name].float()
                param[: ref.shape[0]].copy_(ref + noise * torch.randn(ref.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer = save_tokenizer(path)
    sizes = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    image_processor = (LlavaNextImageProcessor(image_grid_pinpoints=GRID, **sizes) if next_
                       else CLIPImageProcessor(**sizes))
    (LlavaNextProcessor if next_ else LlavaProcessor)(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def vl_family(root: Path) -> dict:
    """A tiny text base (with its tokenizer), two text experts and a LLaVA expert whose language
    model is the base's plus noise with EXTRA_ROWS more vocabulary rows; VQA data to ask it."""
    from tests.tiny_llama import save_tiny_llama
    from tests.vqa_data import textvqa

    base = save_tiny_llama(root / "base", seed=0, tokenizer=True)
    experts = {name: save_tiny_llama(root / f"expert-{name}", seed=i + 1, like=base, noise=0.2, tokenizer=True)
               for i, name in enumerate(("alpha", "beta"))}
    experts["vqa"] = save_tiny_llava(root / "expert-vqa", language_model=base, seed=7, noise=0.2)
    return {"base": base, "experts": experts, "vqa_data": textvqa(root / "textvqa", n=8)}
