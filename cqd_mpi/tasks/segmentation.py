"""`kind: segmentation`: binary segmentation datasets as they ship, scored by a metric library.

`data:` is either a dataset folder or a manifest:

- a folder holding an image folder and a mask folder (`settings.images`, `settings.masks`,
  default `images/` and `masks/`, as Kvasir-SEG ships), matched by file stem: the mask of
  image `<stem>.<ext>` is `<stem><mask_suffix>.<ext>` (ISIC 2017: `mask_suffix: _segmentation`;
  COD10K and CAMO: `images: Image`/`Imgs`, `masks: GT_Object`/`GT`). `image_glob` picks the
  images (ISIC's folder also holds `*_superpixels.png`: `image_glob: "*.jpg"`);
- a manifest, `.jsonl` (one object per line) or `.csv` (a header row), with `image` and `mask`
  paths relative to the manifest and an optional `id`.

Every file must lie inside the data directory (the folder, or the manifest's folder) once symbolic
links are resolved: a link or a manifest path (`../`, absolute) that leaves it is refused, naming
it, so a dataset cannot make the task read files elsewhere on the node.

Every pair is opened at load, before any model runs: an unreadable file, a mask without an
image (or an image without a mask), a mask of another size than its image and an empty mask
are each reported naming the file (a decompression bomb, an image whose pixel count exceeds
PIL's limit, is one such unreadable file). The prompt of each item is fixed at load from the true
mask: its bounding box (optionally jittered), seeded points inside it, or none (the mask
decoder alone). Metrics are the libraries': torchmetrics for IoU, Dice and MAE, py_sod_metrics
for S-measure, weighted F-measure and E-measure; every per-item score is in [0, 1] (MAE as
1 - MAE), and the task's metric is their mean.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.engines.base import MaskPrediction, MaskPrompt, PredictedMask
from cqd_mpi.errors import ConfigError, TaskError, require
from cqd_mpi.tasks.base import BackendStatus, ItemResult, Task

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SHOWN_PROBLEMS = 5


# metrics ------------------------------------------------------------------------------------

def _torchmetrics(name: str):
    return require(name, extra="sam", feature="the segmentation task's metrics")


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Binary IoU (Jaccard index) of one image, torchmetrics' binary_jaccard_index."""
    import torch

    functional = _torchmetrics("torchmetrics.functional.classification")
    return float(functional.binary_jaccard_index(torch.from_numpy(pred).long(), torch.from_numpy(gt).long()))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of one image, torchmetrics' segmentation dice_score."""
    import torch

    functional = _torchmetrics("torchmetrics.functional.segmentation")
    pred_t, gt_t = (torch.from_numpy(a)[None, None].long() for a in (pred, gt))
    return float(functional.dice_score(pred_t, gt_t, num_classes=1, input_format="one-hot")[0])


def one_minus_mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """1 - mean absolute error of the binary mask, torchmetrics' mean_absolute_error."""
    import torch

    functional = _torchmetrics("torchmetrics.functional")
    return 1.0 - float(functional.mean_absolute_error(torch.from_numpy(pred).double(), torch.from_numpy(gt).double()))


def _sod(metric_class: str, key: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def score(pred: np.ndarray, gt: np.ndarray) -> float:
        sod = require("py_sod_metrics", extra="sam", feature="the segmentation task's camouflage/polyp metrics")
        metric = getattr(sod, metric_class)()
        metric.step(pred.astype(np.float64), gt.astype(bool), normalize=False)
        value = metric.get_results()[key]
        value = float(np.mean(value["curve"])) if isinstance(value, dict) else float(value)
        return min(max(value, 0.0), 1.0)

    score.__doc__ = f"py_sod_metrics.{metric_class} of one image, clipped to [0, 1]."
    return score


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "iou": iou,
    "dice": dice,
    "s_measure": _sod("Smeasure", "sm"),
    "weighted_f": _sod("WeightedFmeasure", "wfm"),
    "e_measure": _sod("Emeasure", "em"),
    "mae": one_minus_mae,
}
"""Per-image scores in [0, 1] by the name `settings.metric` gives. E-measure is the mean over
py_sod_metrics' 256 thresholds (the mean E-measure of COD papers)."""

METRIC_MODULES = {"iou": "torchmetrics", "dice": "torchmetrics", "mae": "torchmetrics",
                  "s_measure": "py_sod_metrics", "weighted_f": "py_sod_metrics", "e_measure": "py_sod_metrics"}


# data ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """`settings:` of a segmentation task: where the masks are, the prompt and the metric.

    images, masks: the two folders under `data:` (a folder). mask_suffix: what a mask's stem
    adds to its image's. image_glob: which files of the image folder are images.
    unmatched_images: 'error', or 'skip' images without a mask (COD10K's test images of
    non-camouflaged scenes). mask_threshold: a mask pixel above it is on the object (palette
    and 1-bit masks: any non-zero index), in 8-bit grey levels: a 16-bit mask's threshold is
    scaled to 65535, a 32-bit or float mask's to its own largest value, so a soft border stays a
    border at every depth. prompt: 'box', 'point' or 'none'. box_jitter: each
    box edge moves by up to this fraction of the box's side (seeded). n_points: points per
    item for prompt 'point'. metric: one of METRICS. seed: the prompts' seed. max_items: the
    first N items by id only.
    """

    images: str = "images"
    masks: str = "masks"
    mask_suffix: str = ""
    image_glob: str = "*"
    unmatched_images: Literal["error", "skip"] = "error"
    mask_threshold: int = 127
    prompt: Literal["box", "point", "none"] = "box"
    box_jitter: float = 0.0
    n_points: int = 1
    metric: Literal["iou", "dice", "s_measure", "weighted_f", "e_measure", "mae"] = "iou"
    seed: int = 0
    max_items: int | None = None

    def validate(self, where: str) -> None:
        if not 0 <= self.mask_threshold < 255:
            raise ConfigError(f"{where}.mask_threshold: expected an integer in 0..254, got {self.mask_threshold}")
        if not 0.0 <= self.box_jitter <= 1.0:
            raise ConfigError(f"{where}.box_jitter: expected a fraction in [0, 1], got {self.box_jitter}")
        if self.n_points < 1:
            raise ConfigError(f"{where}.n_points: expected an integer >= 1, got {self.n_points}")
        if self.max_items is not None and self.max_items < 2:
            raise ConfigError(f"{where}.max_items: expected an integer >= 2 or null, got {self.max_items}")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image, its true mask's file and the prompt fixed for it at load."""

    item_id: str
    image: Path
    mask: Path
    prompt: MaskPrompt
    size: tuple[int, int]


def _pil():
    return require("PIL.Image", extra="sam", feature="the segmentation task")


def read_image(path: Path) -> np.ndarray:
    """The image as uint8 RGB [height, width, 3]."""
    with _pil().open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """What opening a bad image raises: OSError, and PIL's DecompressionBombError, which is not one."""
    return (OSError, ValueError, _pil().DecompressionBombError)


def read_mask(path: Path, threshold: int) -> np.ndarray:
    """The mask as bool [height, width]: palette and 1-bit masks by index, others by grey level,
    `threshold` being of 255 and scaled to the mask's own range (Settings.mask_threshold)."""
    with _pil().open(path) as image:
        if image.mode in ("P", "1"):
            return np.asarray(image) > 0
        if image.mode.startswith("I;16"):
            return np.asarray(image).astype(np.float64) > threshold * 65535 / 255
        if image.mode in ("I", "F"):
            values = np.asarray(image).astype(np.float64)
            top = float(values.max()) if values.size else 0.0
            return values > threshold * top / 255 if top > 0 else np.zeros(values.shape, dtype=bool)
        if image.mode != "L":
            image = image.convert("L")
        return np.asarray(image) > threshold


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a fully decoded image, so that a truncated file fails here."""
    with _pil().open(path) as image:
        image.load()
        return image.height, image.width


def _outside(file: Path, root: Path) -> bool:
    """Whether `file`, its symbolic links resolved, lies outside the directory `root`."""
    return not file.resolve().is_relative_to(root.resolve())


def _folder_pairs(root: Path, settings: Settings, where: str) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    image_dir, mask_dir = root / settings.images, root / settings.masks
    for key, folder in (("images", image_dir), ("masks", mask_dir)):
        if not folder.is_dir():
            raise TaskError(f"{where}.{key}: expected the folder {folder}, which does not exist")
    images = {p.stem: p for p in sorted(image_dir.glob(settings.image_glob))
              if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    masks: dict[str, Path] = {}
    problems = []
    for path in sorted(mask_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.stem.endswith(settings.mask_suffix):
            problems.append(f"mask {path}: its name does not end with the mask suffix {settings.mask_suffix!r}")
            continue
        stem = path.stem[: len(path.stem) - len(settings.mask_suffix)] if settings.mask_suffix else path.stem
        if stem not in images:
            problems.append(f"mask {path} has no image {stem}.* in {image_dir}")
            continue
        masks[stem] = path
    pairs = []
    for stem, image in images.items():
        if stem in masks:
            pairs.append((stem, image, masks[stem]))
        elif settings.unmatched_images == "error":
            problems.append(f"image {image} has no mask {stem}{settings.mask_suffix}.* in {mask_dir} "
                            "(unmatched_images: skip leaves such images out)")
    if not pairs and not problems:
        problems.append(f"no image in {image_dir} matching {settings.image_glob!r} has a mask in {mask_dir}")
    leaving = [f for pair in pairs for f in pair[1:] if _outside(f, root)]
    problems += [f"{file} leaves the data directory {root} (to {file.resolve()}): links out of the dataset are "
                 "refused" for file in leaving]
    return [pair for pair in pairs if not set(pair[1:]) & set(leaving)], problems


def _manifest_pairs(path: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    rows: list[tuple[int, dict]] = []
    try:
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    rows.append((number, json.loads(line)))
        else:
            with path.open(newline="") as handle:
                rows = [(number, row) for number, row in enumerate(csv.DictReader(handle), start=2)]
    except (OSError, ValueError, csv.Error) as exc:
        raise TaskError(f"manifest {path}: unreadable ({exc})") from exc
    pairs, problems = [], []
    for number, row in rows:
        if not isinstance(row, dict) or not row.get("image") or not row.get("mask"):
            problems.append(f"manifest {path} line {number}: expected 'image' and 'mask' paths, got {row!r}")
            continue
        image, mask = path.parent / str(row["image"]), path.parent / str(row["mask"])
        leaving = [(what, file) for what, file in (("image", image), ("mask", mask)) if _outside(file, path.parent)]
        problems += [f"manifest {path} line {number}: {what} {file} leaves the manifest's directory {path.parent} "
                     f"(to {file.resolve()}); paths out of the dataset are refused" for what, file in leaving]
        problems += [f"manifest {path} line {number}: {what} {file} does not exist"
                     for what, file in (("image", image), ("mask", mask)) if not leaving and not file.is_file()]
        if leaving:
            continue
        pairs.append((str(row.get("id") or Path(str(row["image"])).stem), image, mask))
    return pairs, problems


def make_prompt(mask: np.ndarray, settings: Settings, item_id: str) -> MaskPrompt:
    """The item's prompt from its true mask; random draws come from (seed, item id)."""
    if settings.prompt == "none":
        return MaskPrompt()
    rng = seeding.numpy_rng(settings.seed, 0, f"segmentation-prompt:{item_id}")
    ys, xs = np.nonzero(mask)
    if settings.prompt == "point":
        picks = rng.choice(len(xs), size=settings.n_points, replace=len(xs) < settings.n_points)
        return MaskPrompt(points=tuple((float(xs[i]), float(ys[i])) for i in picks),
                          labels=(1,) * settings.n_points)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    if settings.box_jitter:
        width, height = x1 - x0 + 1, y1 - y0 + 1
        dx0, dy0, dx1, dy1 = rng.uniform(-1, 1, 4) * settings.box_jitter * np.array([width, height, width, height])
        limit_x, limit_y = mask.shape[1] - 1, mask.shape[0] - 1
        x0, x1 = np.clip([x0 + dx0, x1 + dx1], 0, limit_x)
        y0, y1 = np.clip([y0 + dy0, y1 + dy1], 0, limit_y)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
    return MaskPrompt(box=(float(x0), float(y0), float(x1), float(y1)))


def load_items(data: str | Path | None, settings: Settings, task: str = "") -> dict[str, Item]:
    """Every item of the dataset by id, each pair opened and checked; TaskError lists the bad files."""
    where = f"task {task!r} data" if task else "data"
    if data is None:
        raise TaskError(f"{where}: a segmentation task needs data: a dataset folder or a .jsonl/.csv manifest")
    path = Path(data)
    if path.is_dir():
        pairs, problems = _folder_pairs(path, settings, f"task {task!r} settings" if task else "settings")
    elif path.suffix in (".jsonl", ".csv"):
        pairs, problems = _manifest_pairs(path)
    else:
        raise TaskError(f"{where}: expected a dataset folder or a .jsonl/.csv manifest, got {path}")
    seen: dict[str, Path] = {}
    items: dict[str, Item] = {}
    for item_id, image, mask in pairs:
        if item_id in seen:
            problems.append(f"image {image}: its id {item_id!r} is already taken by {seen[item_id]}")
            continue
        seen[item_id] = image
        if not (image.is_file() and mask.is_file()):
            continue
        item = _check_pair(item_id, image, mask, settings, problems)
        if item is not None:
            items[item_id] = item
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise TaskError(f"{where}: {len(problems)} problem(s) with the dataset {path}: {shown}{more}")
    ordered = dict(sorted(items.items()))
    if settings.max_items is not None:
        ordered = dict(list(ordered.items())[: settings.max_items])
    if len(ordered) < 2:
        raise TaskError(f"{where}: expected at least 2 items in {path}, found {len(ordered)}")
    return ordered


def _check_pair(item_id: str, image: Path, mask: Path, settings: Settings, problems: list[str]) -> Item | None:
    try:
        size = _image_size(image)
    except unreadable_errors() as exc:
        problems.append(f"image {image} is unreadable ({exc})")
        return None
    try:
        truth = read_mask(mask, settings.mask_threshold)
    except unreadable_errors() as exc:
        problems.append(f"mask {mask} is unreadable ({exc})")
        return None
    if truth.shape != size:
        problems.append(f"mask {mask} is {truth.shape[1]}x{truth.shape[0]} pixels but its image {image} is "
                        f"{size[1]}x{size[0]}")
        return None
    if not truth.any():
        problems.append(f"mask {mask} is empty (no pixel above mask_threshold {settings.mask_threshold})")
        return None
    return Item(item_id, image, mask, make_prompt(truth, settings, item_id), size)


# the task -----------------------------------------------------------------------------------

class SegmentationTask(Task):
    """Mean per-image metric of the engine's masks against the true masks."""

    kind = "segmentation"
    Settings = Settings
    requires = MaskPrediction
    batch_size = 8

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.metric_fn = METRICS[self.settings.metric]
        require(METRIC_MODULES[self.settings.metric], extra="sam",
                feature=f"the segmentation metric {self.settings.metric!r}")
        self._items = load_items(self.data, self.settings, self.name)

    def item_ids(self) -> list[str]:
        return list(self._items)

    def item(self, item_id: str) -> Item:
        if item_id not in self._items:
            raise TaskError(f"task {self.name!r}: unknown item id {item_id!r}")
        return self._items[item_id]

    def evaluate(self, model: MaskPrediction, item_ids: Sequence[str]) -> list[ItemResult]:
        items = [self.item(i) for i in item_ids]
        results: dict[str, ItemResult] = {}
        ready: list[tuple[Item, np.ndarray, np.ndarray]] = []
        for item in items:
            try:
                ready.append((item, read_image(item.image), read_mask(item.mask, self.settings.mask_threshold)))
            except unreadable_errors() as exc:
                results[item.item_id] = ItemResult(item.item_id, 0.0, error="unreadable",
                                                   detail={"message": f"{item.image} or {item.mask}: {exc}"})
        started = time.perf_counter()
        predicted = model.predict_masks([image for _, image, _ in ready], [item.prompt for item, _, _ in ready])
        seconds = (time.perf_counter() - started) / max(1, len(ready))
        for (item, _, truth), prediction in zip(ready, predicted):
            results[item.item_id] = self._score(item, truth, prediction, seconds)
        return [results[i] for i in item_ids]

    def _score(self, item: Item, truth: np.ndarray, prediction, seconds: float) -> ItemResult:
        mask = np.asarray(prediction.mask, dtype=bool)
        if mask.shape != truth.shape:
            return ItemResult(item.item_id, 0.0, error="shape", seconds=seconds,
                              detail={"message": f"predicted mask {mask.shape}, true mask {truth.shape}"})
        score = self.metric_fn(mask, truth)
        if not np.isfinite(score):
            return ItemResult(item.item_id, 0.0, error="metric", seconds=seconds,
                              detail={"message": f"{self.settings.metric} gave {score}"})
        return ItemResult(item.item_id, float(score), seconds=seconds,
                          detail={"predicted_iou": float(prediction.iou), "mask_pixels": int(mask.sum())})

    def reference_results(self, item_ids: Sequence[str]) -> list[ItemResult]:
        """Each true mask scored as the prediction: the metric's ceiling (check-tasks)."""
        results = []
        for item_id in item_ids:
            item = self.item(item_id)
            truth = read_mask(item.mask, self.settings.mask_threshold)
            results.append(self._score(item, truth, PredictedMask(mask=truth, iou=1.0), 0.0))
        return results

    def check_backends(self) -> list[BackendStatus]:
        module = METRIC_MODULES[self.settings.metric]
        try:
            require(module, extra="sam", feature="the segmentation metrics")
        except Exception as exc:
            return [BackendStatus(f"metric {self.settings.metric}", False, str(exc))]
        return [BackendStatus(f"metric {self.settings.metric}", True, f"{module}, {len(self._items)} items checked")]
