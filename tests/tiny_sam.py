"""Tiny random SAMs (SamModel from a small SamConfig, saved with transformers) and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cqd_mpi.engines.sam import sam_config, save_model


def save_tiny_sam(path: Path, *, seed: int = 0, scale: float = 0.0, base: Path | None = None) -> Path:
    """A SamModel with seeded random weights, or `base`'s weights plus seeded noise of `scale`
    on every floating-point tensor (convolutions and positional embeddings included)."""
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel.from_pretrained(base) if base is not None else SamModel(sam_config())
    if scale:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_(torch.randn(param.shape, generator=generator) * scale * (param.std(correction=0) + 1e-3))
    return save_model(model, path)


def family(root: Path) -> dict:
    """A base and two experts (base + noise) as SAM dirs."""
    base = save_tiny_sam(root / "base", seed=0)
    experts = {name: save_tiny_sam(root / f"expert-{name}", seed=i + 1, scale=0.3, base=base)
               for i, name in enumerate(("polyp", "skin"))}
    return {"base": base, "experts": experts}


def scene(rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 RGB image with one bright ellipse on a noisy background, and its bool mask."""
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image = rng.normal(80, 20, (height, width, 3))
    image[mask] += rng.uniform(60, 120, 3)
    return np.clip(image, 0, 255).astype(np.uint8), mask
