"""Random Llamas of a named shape as Hugging Face dirs, built offline, for the engine benchmarks.

`llama-3-8b` is the published Llama-3-8B config (hidden 4096, 32 layers, 32 heads with 8
KV heads, MLP 14336, vocab 128256, rope theta 500000); the others are small shapes for a
CPU. Weights are seeded Gaussians (std 0.02) written shard by shard, so an 8B model never
exists whole in memory. The tokenizer is cqd_mpi's tiny offline BPE (ids below 384); the
model's own vocabulary is the shape's, so generated ids past the tokenizer's decode to
nothing, which changes no timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=384, max_position_embeddings=4096),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=384, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
}
SHARD_BYTES = 5 * 10**9


def build(shape: str, out_dir: Path, *, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random Llama of `shape` to out_dir (kept when its config already matches)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from cqd_mpi.engines.tiny import build_tokenizer

    out = Path(out_dir)
    stamp = out / "cqd-shape.json"
    wanted = {"shape": shape, "seed": seed, "dtype": str(dtype)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        names = [(name, tuple(p.shape)) for name, p in LlamaForCausalLM(config).named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape_ in names:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape_, dtype=dtype)
        else:
            tensor = (torch.randn(shape_, generator=generator) * 0.02).to(dtype)
        if current and size + tensor.numel() * tensor.element_size() > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
    shards.append(current)
    index, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        index.update({name: file for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    config.save_pretrained(out)
    stamp.write_text(json.dumps(wanted))
    return out
