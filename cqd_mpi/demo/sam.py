"""The SAM demo: a tiny Segment Anything base and two domain experts, trained on the CPU and cached.

`build()` draws synthetic segmentation scenes of three kinds (`DOMAINS`): generic `shapes`
(ellipses, rectangles and blobs of any colour on plain gradients), `polyps` (low-contrast
blobs with specular highlights on smoothly shaded tissue-coloured backgrounds) and
`camouflage` (striped objects on stripes of the same colours, told apart only by the stripes'
direction). A tiny SamModel built from a config (`cqd_mpi.engines.sam.sam_config`, no download)
is trained on a mix that is mostly `shapes` (the base), then one expert per expert domain is
fine-tuned from the base with a small learning rate, replaying the other domains, as
fine-tunes of a large pretrained model are. Each expert domain also gets a dataset folder in Kvasir-SEG layout (images/ and
masks/ as PNG files) that the real `segmentation` task reads; the models never train on
those scenes. Everything is cached under ``$XDG_CACHE_HOME/cqd_mpi/sam-demo-<version>/``;
the version hashes the recipe. `demo_config()` is the CycleQD run over the two experts.
docs/sam.md records how the recipe was chosen and the claim's calibration over seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqd_mpi import locations
from cqd_mpi.demo.cache import build_cached, deterministic, has_stamp, recipe_version, write_stamp

log = logging.getLogger("cqd_mpi.demo.sam")

RECIPE_FORMAT = 2
"""Bump when the builder's code changes what it writes for an unchanged TrainingRecipe."""

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# scenes ---------------------------------------------------------------------------------------

def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a cells x cells grid of normals, bicubically upsampled."""
    coarse = torch.from_numpy(rng.normal(size=(1, 1, cells, cells)).astype(np.float32))
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field[0, 0].numpy() / 1.5


def _blob(rng: np.random.Generator, size: int, *, radius: tuple[float, float]) -> np.ndarray:
    """A star-shaped blob: radius r0 (1 + sum_k a_k cos(k theta + phi_k)) about a random centre."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r0 = rng.uniform(*radius) * size
    cy, cx = rng.uniform(r0 + 2, size - r0 - 2, 2)
    theta = np.arctan2(yy - cy, xx - cx)
    boundary = np.ones_like(theta)
    for k in (2, 3, 4):
        boundary += rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= r0 * boundary


def _shape(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 2:
        return _blob(rng, size, radius=(0.14, 0.3))
    yy, xx = np.mgrid[:size, :size]
    h, w = rng.uniform(0.2, 0.55, 2) * size
    cy, cx = rng.uniform(h / 2 + 1, size - h / 2 - 1), rng.uniform(w / 2 + 1, size - w / 2 - 1)
    if kind == 0:
        return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0
    return (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)


def shapes_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generic: one shape of a clearly different colour on a gradient, over a distractor shape."""
    yy, xx = np.mgrid[:size, :size] / size
    background = rng.uniform(20, 235, 3) + 40 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)[..., None]
    image = np.broadcast_to(background, (size, size, 3)).copy()
    distractor = _shape(rng, size)
    image[distractor] = rng.uniform(20, 235, 3)
    mask = _shape(rng, size)
    colour = rng.uniform(20, 235, 3)
    while np.abs(colour - background.mean(axis=(0, 1))).sum() < 120:
        colour = rng.uniform(20, 235, 3)
    image[mask] = colour
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def polyps_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Polyp-like: a blob slightly brighter than smoothly shaded pink tissue, with highlights."""
    tissue = np.array([rng.uniform(160, 210), rng.uniform(70, 110), rng.uniform(70, 110)])
    shading = 1.0 + 0.22 * _smooth_field(rng, size, 3)
    image = tissue * shading[..., None]
    mask = _blob(rng, size, radius=(0.16, 0.3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = np.argwhere(mask).mean(axis=0)
    dome = np.clip(1.0 - np.hypot(yy - cy, xx - cx) / (0.35 * size), 0, 1)
    image[mask] *= (rng.uniform(1.08, 1.2) + 0.12 * dome[mask])[:, None]
    for _ in range(int(rng.integers(2, 5))):
        y, x = rng.integers(2, size - 2, 2)
        image[y - 1 : y + 1, x - 1 : x + 1] = 245
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def camouflage_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Camouflage: a striped blob on stripes of the same two colours at another angle."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    first, second = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    while np.abs(first - second).sum() < 150:
        second = rng.uniform(30, 220, 3)
    angle = rng.uniform(0, np.pi)
    turn = angle + np.pi / 2 + rng.uniform(-0.35, 0.35)

    def stripes(theta: float) -> np.ndarray:
        period = rng.uniform(5.0, 8.0)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))
        weight = (0.5 + 0.5 * wave)[..., None]
        return weight * first + (1 - weight) * second

    mask = _blob(rng, size, radius=(0.18, 0.32))
    image = stripes(angle)
    image[mask] = stripes(turn)[mask]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


DOMAINS = {"shapes": shapes_scene, "polyps": polyps_scene, "camouflage": camouflage_scene}


# recipe ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines the SAM demo's models and datasets; its hash names the cache dir."""

    experts: tuple[str, ...] = ("polyps", "camouflage")
    base_domain: str = "shapes"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    decoder_hidden_size: int = 32
    n_items: int = 600
    item_seed: int = 0
    batch_size: int = 32
    base_steps: int = 1000
    base_lr: float = 2e-3
    base_mix: tuple[int, ...] = (6, 1, 1)
    expert_steps: int = 300
    expert_lr: float = 5e-4
    expert_share: int = 3
    replay_experts: bool = True
    seed: int = 0

    def __post_init__(self):
        unknown = [d for d in (*self.experts, self.base_domain) if d not in DOMAINS]
        if unknown or len(self.experts) < 2 or len(self.base_mix) != len(self.experts) + 1:
            raise ValueError(f"TrainingRecipe: expected two or more experts and a base domain among {list(DOMAINS)}, "
                             f"and one base_mix weight for the base domain and each expert's, got "
                             f"experts={self.experts}, base_domain={self.base_domain!r}, base_mix={self.base_mix}")

    @property
    def domains(self) -> tuple[str, ...]:
        return (self.base_domain, *self.experts)

    @property
    def version(self) -> str:
        return recipe_version(self, recipe_format=RECIPE_FORMAT)


@dataclasses.dataclass(frozen=True)
class DemoModels:
    """Where the built models and datasets are: the base dir, one model dir and one dataset per expert."""

    base: Path
    experts: dict[str, Path]
    datasets: dict[str, Path]
    recipe: TrainingRecipe


# training -------------------------------------------------------------------------------------

def _new_model(recipe: TrainingRecipe):
    from transformers import SamModel

    from cqd_mpi.engines.sam import sam_config

    config = sam_config(image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
                        num_layers=recipe.num_layers, num_heads=recipe.num_heads,
                        output_channels=recipe.decoder_hidden_size, window_size=recipe.image_size // recipe.patch_size,
                        global_attn_indexes=(recipe.num_layers - 1,), decoder_mlp_dim=2 * recipe.decoder_hidden_size)
    torch.manual_seed(recipe.seed)
    return SamModel(config)


def _batches(recipe: TrainingRecipe, *, weights: dict[str, int], seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches (pixels normalised as SamImageProcessor does, one point prompt
    inside each object, the mask at the decoder's resolution), domains cycling through `weights`."""
    rng = np.random.default_rng([recipe.seed, seed, 1])
    cycle = [domain for domain, weight in weights.items() for _ in range(weight)]
    low = recipe.image_size // recipe.patch_size * 4
    while True:
        images, masks, points = [], [], []
        for index in range(recipe.batch_size):
            image, mask = DOMAINS[cycle[index % len(cycle)]](rng, recipe.image_size)
            ys, xs = np.nonzero(mask)
            pick = rng.integers(len(xs))
            images.append(image)
            masks.append(mask)
            points.append((float(xs[pick]), float(ys[pick])))
        pixels = (np.stack(images).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        truth = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
        yield {
            "pixel_values": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
            "input_points": torch.tensor(points, dtype=torch.float32)[:, None, None],
            "input_labels": torch.ones(recipe.batch_size, 1, 1, dtype=torch.long),
            "target": torch.nn.functional.interpolate(truth, size=(low, low), mode="area")[:, 0],
        }


def _train(model, batches: Iterator[dict[str, torch.Tensor]], *, steps: int, lr: float, warmup: int) -> float:
    """AdamW, linear warm-up then cosine decay; loss = BCE + Dice on the mask, MSE on the predicted IoU."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for _, batch in zip(range(steps), batches):
        target = batch.pop("target")
        output = model(**batch, multimask_output=False)
        logits = output.pred_masks[:, 0, 0]
        probability = torch.sigmoid(logits)
        dice = 1 - (2 * (probability * target).sum((1, 2)) + 1) / (probability.sum((1, 2)) + target.sum((1, 2)) + 1)
        hard = (logits > 0).float()
        iou = (hard * target).sum((1, 2)) / ((hard + target).clamp(max=1).sum((1, 2)) + 1e-6)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice.mean()
                + torch.nn.functional.mse_loss(output.iou_scores[:, 0, 0], iou.detach()))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def _expert_mix(recipe: TrainingRecipe, domain: str) -> dict[str, int]:
    """An expert's batches: its domain `expert_share` times for each base-domain scene (and each
    other expert's scene too with `replay_experts`)."""
    replayed = recipe.domains if recipe.replay_experts else (recipe.base_domain,)
    return {domain: recipe.expert_share, **{d: 1 for d in replayed if d != domain}}


def write_dataset(domain: str, out: Path, *, n_items: int, size: int, seed: int) -> Path:
    """`n_items` scenes of `domain` as a Kvasir-SEG layout folder: images/<id>.png, masks/<id>.png."""
    from PIL import Image

    rng = np.random.default_rng([seed, 7, list(DOMAINS).index(domain)])
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(n_items):
        image, mask = DOMAINS[domain](rng, size)
        Image.fromarray(image).save(out / "images" / f"{domain}-{index:04d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{domain}-{index:04d}.png")
    return out


def _train_all(recipe: TrainingRecipe, out: Path) -> None:
    from cqd_mpi.engines.sam import save_model

    with deterministic():
        for domain in recipe.experts:
            write_dataset(domain, out / "data" / domain, n_items=recipe.n_items, size=recipe.image_size,
                          seed=recipe.item_seed)
        start = time.perf_counter()
        base = _new_model(recipe)
        mix = dict(zip(recipe.domains, recipe.base_mix))
        loss = _train(base, _batches(recipe, weights=mix, seed=0), steps=recipe.base_steps,
                      lr=recipe.base_lr, warmup=max(1, recipe.base_steps // 10))
        save_model(base, out / "base")
        log.info("SAM demo: base trained on the mix %s (%d steps, loss %.3f, %.0fs)", mix, recipe.base_steps,
                 loss, time.perf_counter() - start)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for index, domain in enumerate(recipe.experts, start=1):
            start = time.perf_counter()
            base.load_state_dict(base_state)
            weights = _expert_mix(recipe, domain)
            loss = _train(base, _batches(recipe, weights=weights, seed=index), steps=recipe.expert_steps,
                          lr=recipe.expert_lr, warmup=max(1, recipe.expert_steps // 10))
            save_model(base, out / domain)
            log.info("SAM demo: %s expert trained (%d steps, loss %.3f, %.0fs)", domain, recipe.expert_steps, loss,
                     time.perf_counter() - start)
        write_stamp(out, recipe)


def _complete(directory: Path, recipe: TrainingRecipe) -> bool:
    models = all((directory / name / file).is_file() for name in ("base", *recipe.experts)
                 for file in ("config.json", "model.safetensors", "preprocessor_config.json"))
    data = all(len(list((directory / "data" / d / "masks").glob("*.png"))) == recipe.n_items for d in recipe.experts)
    return has_stamp(directory, recipe) and models and data


def _models(directory: Path, recipe: TrainingRecipe) -> DemoModels:
    return DemoModels(directory / "base", {d: directory / d for d in recipe.experts},
                      {d: directory / "data" / d for d in recipe.experts}, recipe)


def build(recipe: TrainingRecipe = TrainingRecipe(), *, cache_dir: str | os.PathLike | None = None) -> DemoModels:
    """The SAM demo's base, experts and datasets, built now or reused from the cache if complete."""
    root = Path(cache_dir) if cache_dir is not None else locations.cache_root()
    name = f"sam-demo-{recipe.version}"
    if _complete(root / name, recipe):
        log.info("SAM demo: reusing the models in %s", root / name)
    else:
        log.info("SAM demo: training a tiny SAM base and %d experts into %s", len(recipe.experts), root / name)
    final = build_cached(root, name, complete=lambda path: _complete(path, recipe),
                         train=lambda work: _train_all(recipe, work))
    return _models(final, recipe)


def demo_config(models: DemoModels, *, run_dir: str | os.PathLike = "cqd-sam-demo", seed: int = 0,
                generations: int = 60) -> dict[str, Any]:
    """The run config of `python -m cqd_mpi demo sam`: CycleQD over the two experts, one task each."""
    return {
        "base": str(models.base),
        "experts": [{"task": domain, "path": str(path)} for domain, path in models.experts.items()],
        "tasks": [{"name": domain, "kind": "segmentation", "data": str(models.datasets[domain]),
                   "settings": {"prompt": "point", "metric": "iou", "seed": 0}, "batch_size": 50}
                  for domain in models.experts],
        "qd": {
            "generations": generations,
            "sampling": "elite",
            "crossover": {"mu": 1.0, "sigma": 0.03},
            "mutation": {"kind": "svd", "basis": "child", "rank": "full", "w_max": 0.3},
            "n_bins": 15,
            "search_fraction": 0.25,
        },
        "runtime": {"run_dir": str(run_dir), "seed": seed, "threads": 1},
        "engine": {"kind": "sam", "device": "cpu", "dtype": "float32", "settings": {"batch_size": 50}},
    }
