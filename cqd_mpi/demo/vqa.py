"""The VQA demo (the paper's Table 5 in miniature): the LLM demo's base and text experts, and a
tiny LLaVA whose language model is fine-tuned from that base to answer questions about images.

`build()` reuses (or builds) the LLM demo's models (cqd_mpi.demo.llm, one cache for both demos),
then draws synthetic scenes (`scene`): one to three objects of one shape and one colour on a
dark background, each asked one question, its `colour`, `shape` or `count`. A tiny LLaVA built
from a config (a CLIP vision tower and LLaVA's projector in front of the base's Llama, whose
vocabulary gains the `<image>` token and a padding row, as llava-hf checkpoints do) is trained
on such scenes: the vision stack from scratch at a high learning rate, the language model from
the base at the text experts' small one, so that its task vector is small and merges well.
The held-out scenes are written as a VQA manifest (`kind: textvqa`) that the run scores.
Everything is cached under ``$XDG_CACHE_HOME/cqd_mpi/vqa-demo-<version>/``, the version hashing
this recipe and the LLM demo's. `demo_config()` is the CycleQD run over the three text experts
and the VQA expert (docs/vqa.md, "The VQA demo"); `table()` and `claim()` print its Table 5.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqd_mpi import locations
from cqd_mpi.demo import llm
from cqd_mpi.demo.cache import build_cached, deterministic, has_stamp, recipe_version, write_stamp

log = logging.getLogger("cqd_mpi.demo.vqa")

RECIPE_FORMAT = 2
"""Bump when the builder's code changes what it writes for an unchanged TrainingRecipe."""

IMAGE_TOKEN = "<image>"
EXTRA_ROWS = 2
"""Vocabulary rows the LLaVA adds to the base's: `<image>` and a padding row."""
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                 "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}")
"""The image, the question, then `=` as the skills' prompts end: `<image>colour=`."""
PROMPT = "{question}"

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
           "white": (235, 235, 235)}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = ("colour", "shape", "count")
MAX_COUNT = 3
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# scenes ---------------------------------------------------------------------------------------

def _object(shape: str, size: int, radius: float, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    if shape == "square":
        return (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
    if shape == "circle":
        return np.hypot(yy - cy, xx - cx) <= radius
    top, bottom = cy - radius, cy + radius * 0.8
    half = (yy - top) / (bottom - top) * radius
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """One to MAX_COUNT objects of one shape and colour, apart, on a dark noisy background; and the
    answer to each question about it."""
    colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    count = int(rng.integers(1, MAX_COUNT + 1))
    image = np.broadcast_to(rng.uniform(0, 70, 3), (size, size, 3)).copy()
    radius = size * 0.14
    centres: list[tuple[float, float]] = []
    while len(centres) < count:
        cy, cx = rng.uniform(radius + 1, size - radius - 1, 2)
        if all(math.hypot(cy - y, cx - x) > 2 * radius + 2 for y, x in centres):
            centres.append((cy, cx))
    for cy, cx in centres:
        image[_object(shape, size, radius * rng.uniform(0.85, 1.1), cy, cx)] = COLOURS[colour]
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), {"colour": colour, "shape": shape, "count": str(count)}


def questions(rng: np.random.Generator, size: int, n: int) -> Iterator[tuple[np.ndarray, str, str]]:
    """`n` (image, question, answer) triples, the questions cycling through QUESTIONS."""
    for index in range(n):
        image, answers = scene(rng, size)
        question = QUESTIONS[index % len(QUESTIONS)]
        yield image, question, answers[question]


# recipe ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines the VQA expert and its data (the LLM demo's recipe included);
    its hash names the cache dir."""

    text: llm.TrainingRecipe = dataclasses.field(default_factory=llm.TrainingRecipe)
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    n_items: int = 300
    item_seed: int = 0
    batch_size: int = 48
    replay_batch_size: int = 24
    align_steps: int = 200
    steps: int = 200
    vision_lr: float = 3e-3
    language_lr: float = 1e-4
    seed: int = 0

    @property
    def version(self) -> str:
        return recipe_version(self, recipe_format=RECIPE_FORMAT)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class DemoModels:
    """Where the built models are: the text base, one expert per skill (the VQA one a LLaVA dir),
    and the VQA manifest the run scores."""

    base: Path
    experts: dict[str, Path]
    vqa_data: Path
    recipe: TrainingRecipe


# the model ------------------------------------------------------------------------------------

def _new_model(recipe: TrainingRecipe, base: Path, tokenizer):
    """A LLaVA whose language model is the base's (its weights, EXTRA_ROWS more vocabulary rows
    initialised to the mean embedding) behind a new CLIP vision tower and projector."""
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text_model = AutoModelForCausalLM.from_pretrained(base)
    text_config = text_model.config.to_dict()
    text_config["vocab_size"] = text_model.config.vocab_size + EXTRA_ROWS
    vision = CLIPVisionConfig(hidden_size=recipe.vision_hidden_size, intermediate_size=2 * recipe.vision_hidden_size,
                              num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
                              image_size=recipe.image_size, patch_size=recipe.patch_size,
                              projection_dim=recipe.vision_hidden_size)
    config = LlavaConfig(vision_config=vision, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    source = text_model.state_dict()
    with torch.no_grad():
        language = model.model.language_model
        for name, param in [*(("model." + n, p) for n, p in language.named_parameters()),
                            ("lm_head.weight", model.lm_head.weight)]:
            rows = source[name].shape[0]
            param[:rows].copy_(source[name])
            if param.shape[0] > rows:
                param[rows:] = source[name].mean(dim=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def _processor(recipe: TrainingRecipe, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": recipe.image_size},
                                crop_size={"height": recipe.image_size, "width": recipe.image_size},
                                image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    """What the processor makes of images already at the model's size: rescaled and normalised."""
    array = (np.stack(images).astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _batches(recipe: TrainingRecipe, processor, *, held_out: set[bytes]) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded batches: the rendered question (the image expanded to its tokens), the
    answer and EOS; the loss covers the answer and EOS. Held-out images are skipped."""
    tokenizer = processor.tokenizer
    blank = np.zeros((recipe.image_size, recipe.image_size, 3), dtype=np.uint8)
    prompts = {q: list(processor(images=[blank], text=[_render(processor, q)])["input_ids"][0]) for q in QUESTIONS}
    rng = np.random.default_rng([recipe.seed, 11])
    while True:
        rows, images = [], []
        while len(rows) < recipe.batch_size:
            image, answers = scene(rng, recipe.image_size)
            if image.tobytes() in held_out:
                continue
            question = QUESTIONS[len(rows) % len(QUESTIONS)]
            rows.append((prompts[question], tokenizer(answers[question], add_special_tokens=False)["input_ids"]))
            images.append(image)
        length = max(len(p) + len(a) + 1 for p, a in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (p, a) in enumerate(rows):
            sequence = torch.tensor([*p, *a, tokenizer.eos_token_id])
            input_ids[row, : len(sequence)] = sequence
            labels[row, len(p) : len(sequence)] = sequence[len(p) :]
            mask[row, : len(sequence)] = 1
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": _pixels(images)}


def _render(processor, question: str) -> str:
    """The prompt text of an image question, as the llava engine renders it (engines/llava.py)."""
    conversation = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": PROMPT.format(question=question)}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _train(model, batches: Iterator[dict[str, torch.Tensor]], replay: Iterator[dict[str, torch.Tensor]] | None,
           *, steps: int, vision_lr: float, language_lr: float) -> float:
    """AdamW, linear warm-up then cosine decay: the vision stack at `vision_lr`, the language model
    at `language_lr` (frozen at 0). With `replay`, each step's loss is an image batch's plus a
    text batch's of the demo's skills (as the text experts replay the other skills, so that the
    language model keeps them); returns the last image batch's loss."""
    vision = [p for n, p in model.named_parameters() if "language_model" not in n and not n.startswith("lm_head")]
    language = [p for n, p in model.named_parameters() if "language_model" in n or n.startswith("lm_head")]
    for param in language:
        param.requires_grad_(language_lr > 0)
    groups = [{"params": vision, "lr": vision_lr}] + ([{"params": language, "lr": language_lr}] if language_lr > 0 else [])
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for _, batch in zip(range(steps), batches):
        loss = model(**batch).loss
        optimizer.zero_grad()
        (loss + model(**next(replay)).loss if replay is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def write_manifest(out: Path, *, n_items: int, size: int, seed: int) -> tuple[Path, set[bytes]]:
    """`n_items` held-out questions as a VQA manifest (out/vqa.jsonl, images in out/images/), and
    their images' bytes (the training batches skip them)."""
    from cqd_mpi.errors import require

    image_module = require("PIL.Image", extra="vqa", feature="the VQA demo")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, seen = [], set()
    for index, (image, question, answer) in enumerate(questions(np.random.default_rng([seed, 13]), size, n_items)):
        name = f"q{index:04d}"
        image_module.fromarray(image).save(out / "images" / f"{name}.png")
        seen.add(image.tobytes())
        lines.append(json.dumps({"id": name, "image": f"images/{name}.png", "question": question,
                                 "answers": [answer] * 10}))
    (out / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return out / "vqa.jsonl", seen


def _train_all(recipe: TrainingRecipe, text: llm.DemoModels, out: Path) -> None:
    with deterministic():
        _, held_out = write_manifest(out / "data", n_items=recipe.n_items, size=recipe.image_size,
                                     seed=recipe.item_seed)
        start = time.perf_counter()
        tokenizer = _tokenizer(text.base)
        processor = _processor(recipe, tokenizer)
        model = _new_model(recipe, text.base, tokenizer)
        skills = recipe.text
        replay = (llm._batch(tokenizer, pairs) for pairs in llm._batches(
            dataclasses.replace(skills, batch_size=recipe.replay_batch_size), weights=dict.fromkeys(skills.skills, 1),
            seed=len(skills.skills) + 1, held_out=llm._held_out(skills)))
        batches = _batches(recipe, processor, held_out=held_out)
        _train(model, batches, None, steps=recipe.align_steps, vision_lr=recipe.vision_lr, language_lr=0.0)
        loss = _train(model, batches, replay, steps=recipe.steps, vision_lr=recipe.vision_lr,
                      language_lr=recipe.language_lr)
        model.save_pretrained(out / "vqa")
        processor.save_pretrained(out / "vqa")
        log.info("VQA demo: LLaVA expert trained (%d + %d steps, loss %.3f, %.0fs)", recipe.align_steps, recipe.steps, loss,
                 time.perf_counter() - start)
        write_stamp(out, recipe)


def _complete(directory: Path, recipe: TrainingRecipe) -> bool:
    files = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")
    return (has_stamp(directory, recipe) and all((directory / "vqa" / f).is_file() for f in files)
            and (directory / "data" / "vqa.jsonl").is_file())


def build(recipe: TrainingRecipe = TrainingRecipe(), *, cache_dir: str | os.PathLike | None = None) -> DemoModels:
    """The LLM demo's base and text experts (reused from the cache, or built), and the VQA expert
    and its data, built now or reused from the cache if complete."""
    root = Path(cache_dir) if cache_dir is not None else locations.cache_root()
    text = llm.build(recipe.text, cache_dir=root)
    name = f"vqa-demo-{recipe.version}"
    if _complete(root / name, recipe):
        log.info("VQA demo: reusing the VQA expert in %s", root / name)
    else:
        log.info("VQA demo: training a tiny LLaVA expert from the demo's base into %s", root / name)
    final = build_cached(root, name, complete=lambda path: _complete(path, recipe),
                         train=lambda work: _train_all(recipe, text, work))
    return DemoModels(text.base, {**text.experts, "vqa": final / "vqa"}, final / "data" / "vqa.jsonl", recipe)


def demo_config(models: DemoModels, *, run_dir: str | os.PathLike = "cqd-vqa-demo", seed: int = 0,
                generations: int = 60) -> dict[str, Any]:
    """The run config of `python -m cqd_mpi demo vqa`: the LLM demo's CycleQD run with a fourth,
    visual question answering, skill whose expert is the LLaVA (engine.kind llava); 60
    generations, not the LLM demo's 150, so that the build and the run fit in 10 minutes (a
    generation evaluates four skills here)."""
    text = models.recipe.text
    config = llm.demo_config(llm.DemoModels(models.base, {s: models.experts[s] for s in text.skills}, text),
                             run_dir=run_dir, seed=seed, generations=generations)
    config["experts"].append({"task": "vqa", "path": str(models.experts["vqa"])})
    config["tasks"].append({"name": "vqa", "kind": "textvqa", "data": str(models.vqa_data),
                            "settings": {"prompt": PROMPT, "max_new_tokens": 10}, "batch_size": 50})
    config["engine"] = {"kind": "llava", "device": "cpu", "dtype": "float32",
                        "settings": {"batch_size": text.n_items, "image_batch_size": 50}}
    return config


# Table 5 --------------------------------------------------------------------------------------

def table(report: Mapping) -> list[str]:
    """The Table 5 layout: the base, each expert and the CycleQD aggregate on every skill, with the average."""
    tasks = list(report["tasks"])
    entries = [("base", report["base"]), *((f"expert {t}", e) for t, e in report["experts"].items()),
               ("CycleQD aggregate", report.get("aggregate"))]
    lines = ["Test-split scores of every model on every skill (Table 5)",
             f"{'model':<20}" + "".join(f"{t[:8]:>9}" for t in tasks) + f"{'average':>9}"]
    for label, entry in entries:
        if entry is None:
            continue
        cells = [entry["test_scores"].get(t) for t in tasks]
        mean = entry.get("mean")
        lines.append(f"{label:<20}" + "".join(f"{'-':>9}" if c is None else f"{c:>9.3f}" for c in cells)
                     + (f"{'-':>9}" if mean is None else f"{mean:>9.3f}"))
    return lines


def claim(report: Mapping) -> tuple[bool, str]:
    """Whether the aggregate's average over the skills beats every expert's, with a line that says so."""
    aggregate = report.get("aggregate")
    if aggregate is None or aggregate.get("mean") is None:
        return False, "claim: not checked (the final phase has not evaluated the aggregate)"
    experts = {task: entry["mean"] for task, entry in report["experts"].items()}
    best = max(experts, key=lambda t: experts[t] if experts[t] is not None else -math.inf)
    margin = aggregate["mean"] - experts[best]
    holds = all(m is not None and aggregate["mean"] > m for m in experts.values())
    return holds, (f"claim {'holds' if holds else 'does not hold'}: the CycleQD aggregate's average "
                   f"{aggregate['mean']:.3f} {'beats' if holds else 'does not beat'} every expert's (best: "
                   f"expert {best} {experts[best]:.3f}, margin {margin:+.3f})")
