"""Tiny random Llama models saved with transformers, and the dense reference math the tests compare with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 48


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)


def save_tiny_llama(
    path: Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    like: Path | None = None,
    noise: float = 0.02,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    **config,
) -> Path:
    """A random tiny Llama; with `like`, that model's weights plus seeded noise (an 'expert')."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).to(dtype)
    if like is not None:
        reference = LlamaForCausalLM.from_pretrained(like, dtype=dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
                param.copy_(ref.float() + noise * torch.randn(ref.shape, generator=generator))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        save_tokenizer(path)
    return path


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model, read with safetensors itself (independent of cqd_mpi)."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def logits(path_or_model, tokens=((1, 5, 9, 3, 7, 2),)) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype="auto")
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


def model_with(config_dir: Path, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformers model built from config_dir's config.json holding exactly `tensors`."""
    config = LlamaConfig.from_pretrained(config_dir)
    dtype = next(iter(tensors.values())).dtype
    model = LlamaForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model.eval()


W1, W2 = 1.03, 0.95
BF16_RTOL = 2.0**-8 * 1.01


def family(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A base (with a tokenizer) and three experts, sharded three different ways."""
    base = save_tiny_llama(root / "base", seed=0, dtype=dtype, tokenizer=True)
    return {
        "base": base,
        "p1": save_tiny_llama(root / "p1", seed=1, dtype=dtype, like=base, max_shard_size="20KB"),
        "p2": save_tiny_llama(root / "p2", seed=2, dtype=dtype, like=base, max_shard_size="12KB"),
        "p3": save_tiny_llama(root / "p3", seed=3, dtype=dtype, like=base),
    }


def streamed(stream) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in stream}


def dense_crossover(models, w1=W1, w2=W2):
    """theta_base + w1/(w1+w2) tau_p1 + w2/(w1+w2) tau_p2 in float32, and theta_base, per tensor."""
    base, p1, p2 = (state_dict(models[k]) for k in ("base", "p1", "p2"))
    child = {}
    for name, theta in base.items():
        b = theta.float()
        child[name] = (
            b + w1 / (w1 + w2) * (p1[name].float() - b) + w2 / (w1 + w2) * (p2[name].float() - b)
        )
    return child, {n: t.float() for n, t in base.items()}


def assert_matches(ours: dict, dense32: dict, dtype: torch.dtype):
    assert ours.keys() == dense32.keys()
    exact = total = 0
    for name, value in dense32.items():
        assert ours[name].dtype == dtype, name
        if dtype == torch.bfloat16:
            torch.testing.assert_close(
                ours[name].float(), value, rtol=BF16_RTOL, atol=1e-7, msg=name
            )
            exact += int((ours[name] == value.to(dtype)).sum())
        else:
            torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)
            exact += ours[name].numel()
        total += value.numel()
    assert exact / total > 0.98
