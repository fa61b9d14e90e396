"""The embedded demo: a tiny Llama base and three skill experts, trained on the CPU and cached.

`build()` trains a base briefly on a mix of the synthetic skills (cqd_mpi.tasks.skills), then
one expert per skill from that base with a small learning rate, so that the experts' task
vectors are small and merge well, as fine-tunes of a large pretrained model do. The models
are Hugging Face dirs with a character-level tokenizer, cached under
``$XDG_CACHE_HOME/cqd_mpi/demo-<version>/`` (default ``~/.cache``); the version hashes the
recipe, so changing the recipe rebuilds and an unchanged one reuses the cache. Training is
deterministic: one thread, deterministic algorithms, seeded data, so a rebuild on the same
machine writes the same bytes. `demo_config()` is the run config over those models.
docs/demo-calibration.md records how the recipe and the QD settings were chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqd_mpi import locations
from cqd_mpi.demo.cache import build_cached, deterministic, has_stamp, recipe_version, write_stamp
from cqd_mpi.tasks import skills

log = logging.getLogger("cqd_mpi.demo.llm")

RECIPE_FORMAT = 1
"""Bump when the builder's code changes what it writes for an unchanged TrainingRecipe."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = string.ascii_lowercase + string.digits + ":="


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines the demo models; its hash names the cache dir."""

    skills: tuple[str, ...] = ("reverse", "sort", "shift")
    n_items: int = 300
    min_length: int = 3
    max_length: int = 12
    item_seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    batch_size: int = 64
    base_steps: int = 300
    base_lr: float = 3e-3
    base_mix: tuple[int, ...] = (2, 1, 1)
    expert_steps: int = 200
    expert_lr: float = 1e-4
    expert_share: int = 4
    seed: int = 0

    def __post_init__(self):
        unknown = [s for s in self.skills if s not in skills.SKILLS]
        if unknown or len(self.base_mix) != len(self.skills):
            raise ValueError(f"TrainingRecipe: skills must be among {list(skills.SKILLS)} with one base_mix "
                             f"weight each, got skills={self.skills}, base_mix={self.base_mix}")

    @property
    def version(self) -> str:
        return recipe_version(self, recipe_format=RECIPE_FORMAT)

    def task_settings(self, skill: str) -> dict[str, Any]:
        return {"skill": skill, "n_items": self.n_items, "min_length": self.min_length,
                "max_length": self.max_length, "seed": self.item_seed}


@dataclasses.dataclass(frozen=True)
class DemoModels:
    """Where the built models are: the base dir and one dir per skill."""

    base: Path
    experts: dict[str, Path]
    recipe: TrainingRecipe


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: one token per character, BOS prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _new_model(recipe: TrainingRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        max_position_embeddings=4 * (recipe.max_length + 8), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def _batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+EOS sequences; the loss covers the answer and EOS only."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
    input_ids = torch.full((len(pairs), length), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        sequence = torch.tensor([*p, *a, tokenizer.eos_token_id])
        input_ids[row, : len(sequence)] = sequence
        labels[row, len(p) : len(sequence)] = sequence[len(p) :]
        mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _batches(recipe: TrainingRecipe, *, weights: dict[str, int], seed: int, held_out: set[str]
             ) -> Iterator[list[tuple[str, str]]]:
    """Endless training batches whose skills cycle through `weights`; held-out prompts are skipped."""
    rng = np.random.default_rng([recipe.seed, seed])
    cycle = [skill for skill, weight in weights.items() for _ in range(weight)]
    while True:
        pairs = []
        while len(pairs) < recipe.batch_size:
            pair = skills.sample(cycle[len(pairs) % len(cycle)], rng, min_length=recipe.min_length,
                                 max_length=recipe.max_length)
            if pair[0] not in held_out:
                pairs.append(pair)
        yield pairs


def _train(model, tokenizer, batches: Iterator[list[tuple[str, str]]], *, steps: int, lr: float,
           warmup: int) -> float:
    """AdamW with linear warm-up and cosine decay to zero; returns the last batch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for _, pairs in zip(range(steps), batches):
        loss = model(**_batch(tokenizer, pairs)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def _held_out(recipe: TrainingRecipe) -> set[str]:
    """Prompts of every item of the demo's tasks: the models never train on them."""
    return {question for skill in recipe.skills
            for question, _ in skills.items(skills.Settings(**recipe.task_settings(skill))).values()}


def _save(model, tokenizer, out: Path) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train_all(recipe: TrainingRecipe, out: Path) -> None:
    tokenizer = build_tokenizer()
    held_out = _held_out(recipe)
    with deterministic():
        start = time.perf_counter()
        base = _new_model(recipe, tokenizer)
        batches = _batches(recipe, weights=dict(zip(recipe.skills, recipe.base_mix)), seed=0,
                           held_out=held_out)
        loss = _train(base, tokenizer, batches, steps=recipe.base_steps, lr=recipe.base_lr,
                      warmup=max(1, recipe.base_steps // 3))
        _save(base, tokenizer, out / "base")
        log.info("demo: base trained on the skill mix (%d steps, loss %.3f, %.0fs)",
                 recipe.base_steps, loss, time.perf_counter() - start)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for index, skill in enumerate(recipe.skills, start=1):
            start = time.perf_counter()
            base.load_state_dict(base_state)
            weights = {s: recipe.expert_share if s == skill else 1 for s in recipe.skills}
            batches = _batches(recipe, weights=weights, seed=index, held_out=held_out)
            loss = _train(base, tokenizer, batches, steps=recipe.expert_steps, lr=recipe.expert_lr,
                          warmup=max(1, recipe.expert_steps // 10))
            _save(base, tokenizer, out / skill)
            log.info("demo: %s expert trained (%d steps, loss %.3f, %.0fs)",
                     skill, recipe.expert_steps, loss, time.perf_counter() - start)


def _complete(directory: Path, recipe: TrainingRecipe) -> bool:
    return has_stamp(directory, recipe) and all(
        (directory / name / file).is_file()
        for name in ("base", *recipe.skills)
        for file in ("config.json", "model.safetensors", "tokenizer.json"))


def _models(directory: Path, recipe: TrainingRecipe) -> DemoModels:
    return DemoModels(directory / "base", {s: directory / s for s in recipe.skills}, recipe)


def build(recipe: TrainingRecipe = TrainingRecipe(), *, cache_dir: str | os.PathLike | None = None) -> DemoModels:
    """The demo's base and experts, trained now or reused from the cache if complete.

    Training writes into a private temporary dir that is renamed into place only when
    complete, so an interrupted build is never reused; leftovers of dead builds are removed
    (demo/cache.py).
    """
    root = Path(cache_dir) if cache_dir is not None else locations.cache_root()
    name = f"demo-{recipe.version}"
    if _complete(root / name, recipe):
        log.info("demo: reusing the models in %s", root / name)
        return _models(root / name, recipe)
    log.info("demo: training a tiny Llama base and %d experts into %s", len(recipe.skills), root / name)

    def train(work: Path) -> None:
        _train_all(recipe, work)
        write_stamp(work, recipe)

    final = build_cached(root, name, complete=lambda path: _complete(path, recipe), train=train)
    return _models(final, recipe)


def demo_config(models: DemoModels, *, run_dir: str | os.PathLike = "cqd-demo", seed: int = 0,
                generations: int = 150) -> dict[str, Any]:
    """The run config of `python -m cqd_mpi`: CycleQD with the paper's settings over the demo models."""
    recipe = models.recipe
    return {
        "base": str(models.base),
        "experts": [{"task": skill, "path": str(path)} for skill, path in models.experts.items()],
        "tasks": [{"name": skill, "kind": "skills", "settings": recipe.task_settings(skill),
                   "batch_size": recipe.n_items} for skill in recipe.skills],
        "qd": {
            "generations": generations,
            "sampling": "elite",
            "crossover": {"mu": 1.0, "sigma": 0.03},
            "mutation": {"kind": "svd", "basis": "child", "rank": "full", "w_max": 0.3},
            "n_bins": 15,
            "search_fraction": 0.5,
        },
        "runtime": {"run_dir": str(run_dir), "seed": seed, "threads": 1},
        "engine": {"device": "cpu", "dtype": "float32", "settings": {"batch_size": recipe.n_items}},
    }
