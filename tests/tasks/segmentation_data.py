"""Segmentation datasets written as the public ones ship them (PNG/JPEG files), for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.tiny_sam import scene


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    return path


def kvasir(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Kvasir-SEG: images/<id>.jpg and masks/<id>.jpg (JPEG masks, 0/255 with compression noise)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = scene(rng, (64, 56 if i % 2 else 64))
        name = f"cju{i:04d}kvasir"
        _save(image, root / "images" / f"{name}.jpg")
        _save(mask.astype(np.uint8) * 255, root / "masks" / f"{name}.jpg")
    return root


def isic(root: Path, n: int = 6, seed: int = 1) -> Path:
    """ISIC 2017: ISIC-2017_Training_Data/ISIC_<n>.jpg (with *_superpixels.png beside them) and
    ISIC-2017_Training_Part1_GroundTruth/ISIC_<n>_segmentation.png."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = scene(rng, (48, 64))
        name = f"ISIC_{i:07d}"
        _save(image, root / "ISIC-2017_Training_Data" / f"{name}.jpg")
        _save(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), root / "ISIC-2017_Training_Data" / f"{name}_superpixels.png")
        _save(mask.astype(np.uint8) * 255, root / "ISIC-2017_Training_Part1_GroundTruth" / f"{name}_segmentation.png")
    return root


ISIC_SETTINGS = {"images": "ISIC-2017_Training_Data", "masks": "ISIC-2017_Training_Part1_GroundTruth",
                 "mask_suffix": "_segmentation", "image_glob": "*.jpg"}
