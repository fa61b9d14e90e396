"""VQA data written as TextVQA ships it (questions JSON + train_images/) or as a jsonl manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "black": (10, 10, 10)}


def colour_image(path: Path, colour: str, size: int = 24) -> Path:
    """A square of one colour: the question about it is its colour."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:] = COLOURS[colour]
    Image.fromarray(array).save(path)
    return path


def textvqa(root: Path, n: int = 6) -> Path:
    """TextVQA_0.5.1_val.json with `n` questions and their images in train_images/<image_id>.jpg."""
    names = list(COLOURS)
    data = []
    for i in range(n):
        colour = names[i % len(names)]
        image_id = f"{i:04x}deadbeef"
        colour_image(root / "train_images" / f"{image_id}.jpg", colour)
        data.append({"question_id": 34602 + i, "image_id": image_id, "question": "what colour is it?",
                     "answers": [colour] * 7 + ["a " + colour, "unanswerable", colour.upper()],
                     "image_classes": ["Poster"], "set_name": "val"})
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}))
    return path


def manifest(root: Path, n: int = 4) -> Path:
    """A jsonl manifest: image (relative), question, answers, id."""
    names = list(COLOURS)
    lines = []
    for i in range(n):
        colour = names[i % len(names)]
        colour_image(root / "img" / f"q{i}.png", colour)
        lines.append(json.dumps({"id": f"q{i}", "image": f"img/q{i}.png", "question": "colour?",
                                 "answers": [colour] * 10}))
    path = root / "vqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
