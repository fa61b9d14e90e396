"""`kind: textvqa`: visual question answering scored by the standard VQA accuracy.

`data:` is either TextVQA's questions JSON as it ships (`TextVQA_0.5.1_val.json`: a `data`
list of entries with `question_id`, `image_id`, `question` and 10 `answers`), whose images
are `<settings.images>/<image_id><settings.image_extension>` next to it (`train_images/`, where
TextVQA's val images live), or a `.jsonl` manifest for other VQA sets: one object a line with
`image` (a path relative to the manifest), `question`, `answers` (a list, or one string) and
an optional `id`.

Every entry is checked at load, before any model runs: a missing field, an entry without
answers, a missing or unreadable image, a repeated id; the first few problems are named in
one line. The question the model sees is `settings.prompt` with `{question}` filled in
(LLaVA's TextVQA prompt by default); its greedy answer is scored by `vqa_accuracy`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cqd_mpi.engines.base import VisualQuestionAnswering
from cqd_mpi.errors import ConfigError, TaskError, require
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task
from cqd_mpi.tasks.vqa_accuracy import normalize, vqa_accuracy

SHOWN_PROBLEMS = 5
LLAVA_PROMPT = "{question}\nAnswer the question using a single word or phrase."


@dataclasses.dataclass
class Settings:
    """`settings:` of a textvqa task.

    images: the image folder of a TextVQA JSON, relative to it. image_extension: what follows
    an `image_id`. prompt: the user text, `{question}` replaced by the question.
    max_new_tokens: the answer's length bound. max_items: the first N items by id only.
    """

    images: str = "train_images"
    image_extension: str = ".jpg"
    prompt: str = LLAVA_PROMPT
    max_new_tokens: int = 16
    max_items: int | None = None

    def validate(self, where: str) -> None:
        if "{question}" not in self.prompt:
            raise ConfigError(f"{where}.prompt: expected a format with {{question}} in it, got {self.prompt!r}")
        try:
            self.prompt.format(question="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{where}.prompt: expected only {{question}} as a field, got {self.prompt!r} "
                              f"({type(exc).__name__}: {exc})") from None
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens: expected an integer >= 1, got {self.max_new_tokens}")
        if self.max_items is not None and self.max_items < 2:
            raise ConfigError(f"{where}.max_items: expected an integer >= 2 or null, got {self.max_items}")


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: str
    image: Path
    question: str
    answers: tuple[str, ...]


def _pil():
    return require("PIL.Image", extra="vqa", feature="the textvqa task")


def read_image(path: Path) -> np.ndarray:
    """The image as uint8 RGB [height, width, 3]."""
    with _pil().open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _entries(path: Path, settings: Settings) -> list[tuple[str, dict, str, Path | None]]:
    """(where, entry, id, image path) of every entry of the JSON or the manifest."""
    try:
        if path.suffix == ".jsonl":
            rows = [(f"line {n}", json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1)
                    if line.strip()]
        else:
            content = json.loads(path.read_text())
            data = content.get("data") if isinstance(content, dict) else None
            if not isinstance(data, list):
                raise TaskError(f"{path}: expected TextVQA's questions JSON, an object with a 'data' list")
            rows = [(f"data[{n}]", entry) for n, entry in enumerate(data)]
    except (OSError, ValueError) as exc:
        raise TaskError(f"{path}: unreadable ({exc})") from None
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            out.append((where, {}, "", None))
        elif path.suffix == ".jsonl":
            image = row.get("image")
            item_id = str(row.get("id") or (Path(str(image)).stem if image else ""))
            out.append((where, row, item_id, path.parent / str(image) if image else None))
        else:
            image_id, question_id = row.get("image_id"), row.get("question_id")
            image = path.parent / settings.images / f"{image_id}{settings.image_extension}" if image_id else None
            out.append((where, row, "" if question_id is None else str(question_id), image))
    return out


def load_items(data: str | Path | None, settings: Settings, task: str = "") -> dict[str, Item]:
    """Every item by id, each entry and image checked; TaskError names the bad entries."""
    where = f"task {task!r} data" if task else "data"
    if data is None:
        raise TaskError(f"{where}: a textvqa task needs data: TextVQA's questions .json or a .jsonl manifest")
    path = Path(data)
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        raise TaskError(f"{where}: expected an existing .json (TextVQA) or .jsonl manifest, got {path}")
    problems: list[str] = []
    items: dict[str, Item] = {}
    for entry_where, row, item_id, image in _entries(path, settings):
        name = f"{path} {entry_where}" + (f" (id {item_id})" if item_id else "")
        answers = row.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if not item_id:
            problems.append(f"{name}: expected an id (question_id, or a manifest's id or image)")
        elif item_id in items:
            problems.append(f"{name}: the id {item_id!r} is taken by an earlier entry")
        elif not isinstance(row.get("question"), str) or not row["question"].strip():
            problems.append(f"{name}: expected a question, got {row.get('question')!r}")
        elif not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            problems.append(f"{name}: expected a non-empty list of answers, got {row.get('answers')!r}")
        elif image is None:
            problems.append(f"{name}: expected an image ({'image' if path.suffix == '.jsonl' else 'image_id'})")
        elif not image.is_file():
            problems.append(f"{name}: its image {image} does not exist")
        else:
            try:
                with _pil().open(image) as opened:
                    opened.load()
            except OSError as exc:
                problems.append(f"{name}: its image {image} is unreadable ({exc})")
                continue
            items[item_id] = Item(item_id, image, row["question"], tuple(answers))
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise TaskError(f"{where}: {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}: {shown}{more}")
    ordered = dict(sorted(items.items()))
    if settings.max_items is not None:
        ordered = dict(list(ordered.items())[: settings.max_items])
    if len(ordered) < 2:
        raise TaskError(f"{where}: expected at least 2 items in {path}, found {len(ordered)}")
    return ordered


class TextVQATask(Task):
    """Mean VQA accuracy of the engine's greedy answers."""

    kind = "textvqa"
    Settings = Settings
    requires = VisualQuestionAnswering
    batch_size = 8

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._items = load_items(self.data, self.settings, self.name)

    def item_ids(self) -> list[str]:
        return list(self._items)

    def item(self, item_id: str) -> Item:
        if item_id not in self._items:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}")
        return self._items[item_id]

    def question(self, item_id: str) -> str:
        """The user text the model sees for the item."""
        return self.settings.prompt.format(question=self.item(item_id).question)

    def evaluate(self, model: VisualQuestionAnswering, item_ids: Sequence[str]) -> list[ItemResult]:
        items = [self.item(i) for i in item_ids]
        results: dict[str, ItemResult] = {}
        ready: list[tuple[Item, np.ndarray]] = []
        for item in items:
            try:
                ready.append((item, read_image(item.image)))
            except OSError as exc:
                results[item.item_id] = ItemResult(item.item_id, 0.0, error="unreadable",
                                                   detail={"message": f"{item.image}: {exc}"})
        started = time.perf_counter()
        answers = model.answer([image for _, image in ready], [self.question(item.item_id) for item, _ in ready],
                               max_new_tokens=self.settings.max_new_tokens)
        seconds = (time.perf_counter() - started) / max(1, len(ready))
        for (item, _), answer in zip(ready, answers):
            results[item.item_id] = ItemResult(item.item_id, vqa_accuracy(answer, item.answers), seconds=seconds,
                                               detail={"answer": answer, "normalized": normalize(answer)})
        return [results[i] for i in item_ids]

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """Each item's most common annotator answer scored as the prediction (check-tasks)."""
        results = []
        for item_id in item_ids:
            item = self.item(item_id)
            normalized = [normalize(a) for a in item.answers]
            best = max(item.answers, key=lambda a: normalized.count(normalize(a)))
            results.append(ItemResult(item_id, vqa_accuracy(best, item.answers), detail={"answer": best}))
        return results

    def check_backends(self) -> list[BackendStatus]:
        return [BackendStatus("images", True, f"{len(self._items)} items, every image opened at load")]
