"""The segmentation task: Kvasir-SEG, ISIC 2017 and manifest layouts load and score; bad data is
named at load; metrics equal the libraries' on known masks; prompts are fixed and seeded."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cqd_mpi import schema
from cqd_mpi.engines.base import MaskPrediction, PredictedMask
from cqd_mpi.errors import ConfigError, TaskError
from cqd_mpi.run import config as config_mod
from cqd_mpi.tasks import task_class
from cqd_mpi.tasks.base import TaskContext
from cqd_mpi.tasks.segmentation import METRICS, SegmentationTask, Settings, load_items
from tests.tasks.segmentation_data import ISIC_SETTINGS, isic, kvasir
from tests.tiny_sam import family


def make_task(data, name="seg", **settings):
    built = schema.build(Settings, settings, "settings")
    return SegmentationTask(name=name, data=str(data), settings=built, context=TaskContext())


@pytest.fixture(scope="module")
def sams(tmp_path_factory):
    return family(tmp_path_factory.mktemp("sam-family"))


@pytest.fixture(scope="module")
def engine(sams):
    from cqd_mpi.engines.sam import SamEngine

    return SamEngine(sams["base"], device="cpu")


@pytest.fixture
def kvasir_dir(tmp_path):
    return kvasir(tmp_path / "Kvasir-SEG")


@pytest.fixture
def isic_dir(tmp_path):
    return isic(tmp_path / "ISIC2017")


# metrics --------------------------------------------------------------------------------------

def known_masks():
    truth = np.zeros((40, 48), dtype=bool)
    truth[10:30, 12:32] = True
    return {"perfect": truth.copy(), "empty": np.zeros_like(truth), "shifted": np.roll(truth, 5, axis=1)}, truth


def test_metrics_equal_the_libraries_on_known_masks():
    import py_sod_metrics as sod
    from torchmetrics.functional import mean_absolute_error
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

    masks, truth = known_masks()
    expected_iou = {"perfect": 1.0, "empty": 0.0, "shifted": 300 / 500}
    expected_dice = {"perfect": 1.0, "empty": 0.0, "shifted": 2 * 300 / 800}
    for case, pred in masks.items():
        scores = {name: metric(pred, truth) for name, metric in METRICS.items()}
        assert all(0.0 <= v <= 1.0 for v in scores.values()), (case, scores)
        assert scores["iou"] == pytest.approx(expected_iou[case])
        assert scores["dice"] == pytest.approx(expected_dice[case])
        assert scores["mae"] == pytest.approx(1 - np.mean(pred != truth))
        p, t = torch.from_numpy(pred).long(), torch.from_numpy(truth).long()
        assert scores["iou"] == pytest.approx(float(binary_jaccard_index(p, t)))
        assert scores["dice"] == pytest.approx(float(binary_f1_score(p, t)))
        assert scores["mae"] == pytest.approx(1 - float(mean_absolute_error(p.double(), t.double())))
        library = {}
        for key, cls, result in (("s_measure", sod.Smeasure, "sm"), ("weighted_f", sod.WeightedFmeasure, "wfm"),
                                 ("e_measure", sod.Emeasure, "em")):
            metric = cls()
            metric.step(pred.astype(np.uint8) * 255, truth.astype(np.uint8) * 255)
            value = metric.get_results()[result]
            library[key] = float(np.mean(value["curve"])) if isinstance(value, dict) else float(value)
            assert scores[key] == pytest.approx(min(library[key], 1.0), abs=1e-9), (case, key)
        if case == "perfect":
            assert scores["s_measure"] == pytest.approx(1.0) and scores["weighted_f"] == pytest.approx(1.0)
            assert scores["e_measure"] > 0.99
        if case == "empty":
            assert scores["weighted_f"] == 0.0 and scores["s_measure"] < 0.5
        if case == "shifted":
            assert 0.3 < scores["s_measure"] < 1 and 0.3 < scores["e_measure"] < 1
            assert 0.3 < scores["weighted_f"] < expected_dice[case]


# layouts --------------------------------------------------------------------------------------

def test_a_kvasir_folder_loads_and_scores_with_sam(kvasir_dir, engine):
    task = make_task(kvasir_dir)
    ids = task.item_ids()
    assert ids == sorted(ids) and len(ids) == 6 and ids[0] == "cju0000kvasir"
    results = task.evaluate(engine, ids)
    assert [r.item_id for r in results] == ids
    assert all(0.0 <= r.score <= 1.0 and r.error is None for r in results)
    assert all(isinstance(r.detail["predicted_iou"], float) for r in results)
    reordered = task.evaluate(engine, ids[::-1])[::-1]
    assert [(r.item_id, r.score, r.detail) for r in reordered] == [(r.item_id, r.score, r.detail) for r in results]
    reference = task.reference_results(ids)
    assert [r.score for r in reference] == [1.0] * 6


def test_an_isic_folder_loads_by_suffix_and_scores_every_metric(isic_dir, engine):
    with pytest.raises(TaskError, match=r"ISIC_0000000_superpixels.png has no mask ISIC_0000000_superpixels_segm"):
        make_task(isic_dir, **{k: v for k, v in ISIC_SETTINGS.items() if k != "image_glob"})
    ids = None
    for metric in METRICS:
        task = make_task(isic_dir, metric=metric, prompt="point", n_points=2, **ISIC_SETTINGS)
        ids = ids or task.item_ids()
        assert task.item_ids() == ids == [f"ISIC_{i:07d}" for i in range(6)]
        scores = [r.score for r in task.evaluate(engine, ids)]
        assert all(0.0 <= s <= 1.0 for s in scores), (metric, scores)
        assert [r.score for r in task.reference_results(ids[:2])] == [pytest.approx(METRICS[metric](m, m)) for m in
                                                                      [load_mask(task, i) for i in ids[:2]]]


def load_mask(task, item_id):
    from cqd_mpi.tasks.segmentation import read_mask

    return read_mask(task.item(item_id).mask, 127)


def test_manifests_in_jsonl_and_csv_give_the_same_items(kvasir_dir, tmp_path):
    rows = [{"id": f"k{i}", "image": f"Kvasir-SEG/images/{p.name}", "mask": f"Kvasir-SEG/masks/{p.name}"}
            for i, p in enumerate(sorted((kvasir_dir / "images").iterdir()))]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("image,mask,id\n" + "".join(f"{r['image']},{r['mask']},{r['id']}\n" for r in rows))
    from_jsonl, from_csv = make_task(jsonl), make_task(csv_path)
    assert from_jsonl.item_ids() == from_csv.item_ids() == [f"k{i}" for i in range(6)]
    folder = make_task(kvasir_dir)
    assert [from_jsonl.item(i).prompt for i in from_jsonl.item_ids()] != [] and \
        [from_csv.item(i).image for i in from_csv.item_ids()] == [folder.item(i).image for i in folder.item_ids()]
    jsonl.write_text(jsonl.read_text() + '{"image": "Kvasir-SEG/images/missing.jpg", "mask": "x.png"}\n')
    with pytest.raises(TaskError, match=r"items.jsonl line 7: image .*missing.jpg does not exist"):
        make_task(jsonl)


# bad data -------------------------------------------------------------------------------------

def test_each_kind_of_bad_data_is_named_at_load(kvasir_dir):
    masks, images = kvasir_dir / "masks", kvasir_dir / "images"
    shutil.copy(masks / "cju0000kvasir.jpg", masks / "orphan.jpg")
    with pytest.raises(TaskError, match=r"1 problem\(s\).*mask .*masks/orphan.jpg has no image orphan\.\* in"):
        make_task(kvasir_dir)
    (masks / "orphan.jpg").unlink()

    (images / "cju0001kvasir.jpg").write_bytes(b"not an image at all")
    with pytest.raises(TaskError, match=r"image .*images/cju0001kvasir.jpg is unreadable \(cannot identify"):
        make_task(kvasir_dir)
    kvasir(kvasir_dir)

    data = (images / "cju0002kvasir.jpg").read_bytes()
    (images / "cju0002kvasir.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskError, match=r"image .*cju0002kvasir.jpg is unreadable"):
        make_task(kvasir_dir)
    kvasir(kvasir_dir)

    Image.new("L", (30, 20)).save(masks / "cju0003kvasir.jpg")
    with pytest.raises(TaskError, match=r"mask .*cju0003kvasir.jpg is 30x20 pixels but its image .*cju0003kvasir"
                                        r".jpg is 56x64"):
        make_task(kvasir_dir)
    Image.new("L", (56, 64)).save(masks / "cju0003kvasir.jpg")
    with pytest.raises(TaskError, match=r"mask .*cju0003kvasir.jpg is empty \(no pixel above mask_threshold 127"):
        make_task(kvasir_dir)
    (masks / "cju0003kvasir.jpg").unlink()
    with pytest.raises(TaskError, match=r"image .*cju0003kvasir.jpg has no mask cju0003kvasir\.\* in"):
        make_task(kvasir_dir)
    assert len(make_task(kvasir_dir, unmatched_images="skip").item_ids()) == 5
    with pytest.raises(TaskError, match=r"task 'seg' settings.masks: expected the folder .*Kvasir-SEG/GT, which does not exist"):
        make_task(kvasir_dir, masks="GT")
    with pytest.raises(TaskError, match=r"needs data: a dataset folder"):
        SegmentationTask(name="seg", data=None, settings=Settings(), context=TaskContext())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 1-bit pixels and holds no data: a decompression bomb
    as PIL sees it (its size is checked at open, before any pixel is read)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_an_unreadable_file_named_at_load_and_at_evaluation(kvasir_dir, engine):
    images, masks = kvasir_dir / "images", kvasir_dir / "masks"
    task = make_task(kvasir_dir)
    ids = task.item_ids()
    (images / f"{ids[2]}.jpg").write_bytes(png_header_only(20000, 20000))
    results = task.evaluate(engine, ids[:3])
    assert results[2].error == "unreadable" and "exceeds limit" in results[2].detail["message"]
    with pytest.raises(TaskError, match=rf"image .*{ids[2]}.jpg is unreadable \(Image size \(400000000 pixels\) "
                                        r"exceeds limit"):
        make_task(kvasir_dir)
    kvasir(kvasir_dir)
    (masks / f"{ids[0]}.jpg").write_bytes(png_header_only(20000, 20000))
    with pytest.raises(TaskError, match=rf"mask .*{ids[0]}.jpg is unreadable \(Image size"):
        make_task(kvasir_dir)


def test_a_16_bit_mask_is_thresholded_on_its_own_range(tmp_path):
    from cqd_mpi.tasks.segmentation import read_mask

    object_, border = np.zeros((8, 8), dtype=np.uint16), np.zeros((8, 8), dtype=bool)
    object_[2:6, 2:6] = 65535
    object_[1, 1:7] = 1000  # a soft border: 1000/65535 is 4/255 of the scale, far below 127/255
    border[1, 1:7] = True
    Image.fromarray(object_).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode == "I;16"
    eight = (object_.astype(np.float64) / 257).round().astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "m8.png")
    Image.fromarray(object_.astype(np.float32) / 65535).save(tmp_path / "mf.tif")
    expected = object_ == 65535
    for name in ("m16.png", "m8.png", "mf.tif"):
        assert np.array_equal(read_mask(tmp_path / name, 127), expected), name
        assert np.array_equal(read_mask(tmp_path / name, 0), expected | border), name


def test_links_and_manifest_paths_out_of_the_data_directory_are_refused(kvasir_dir, tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(kvasir_dir / "images" / "cju0001kvasir.jpg", outside)
    (kvasir_dir / "images" / "cju0001kvasir.jpg").unlink()
    (kvasir_dir / "images" / "cju0001kvasir.jpg").symlink_to(outside)
    with pytest.raises(TaskError, match=r"1 problem\(s\).*images/cju0001kvasir.jpg leaves the data directory "
                                        r".*Kvasir-SEG \(to .*elsewhere.jpg\): links out of the dataset are refused"):
        make_task(kvasir_dir)
    (kvasir_dir / "images" / "cju0001kvasir.jpg").unlink()
    (kvasir_dir / "images" / "cju0001kvasir.jpg").symlink_to(kvasir_dir / "masks" / "cju0001kvasir.jpg")
    assert len(make_task(kvasir_dir).item_ids()) == 6  # a link inside the dataset is fine
    manifest = kvasir_dir / "items.jsonl"
    rows = [{"image": f"images/{p.name}", "mask": f"masks/{p.name}"} for p in sorted((kvasir_dir / "masks").iterdir())]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(make_task(manifest).item_ids()) == 6
    for bad in ("../elsewhere.jpg", str(outside)):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"image": bad, "mask": "masks/x.jpg"}]))
        with pytest.raises(TaskError, match=r"items.jsonl line 7: image .*elsewhere.jpg leaves the manifest's "
                                            r"directory .*Kvasir-SEG \(to .*elsewhere.jpg\); paths out of the dataset"):
            make_task(manifest)


def test_an_item_unreadable_at_evaluation_scores_zero_and_the_rest_are_scored(kvasir_dir, engine):
    task = make_task(kvasir_dir)
    ids = task.item_ids()
    (kvasir_dir / "images" / f"{ids[1]}.jpg").write_bytes(b"gone")
    results = task.evaluate(engine, ids)
    assert results[1].score == 0.0 and results[1].error == "unreadable"
    assert ids[1] in results[1].detail["message"]
    assert all(r.error is None for i, r in enumerate(results) if i != 1)


def test_settings_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"settings.prompt: expected one of 'box' \| 'point' \| 'none', got 'polygon'"):
        schema.build(Settings, {"prompt": "polygon"}, "settings")
    with pytest.raises(ConfigError, match=r"settings.box_jitter: expected a fraction in \[0, 1\], got 2.0"):
        schema.build(Settings, {"box_jitter": 2.0}, "settings")
    with pytest.raises(ConfigError, match=r"settings.metric: expected one of 'iou' \| 'dice'"):
        schema.build(Settings, {"metric": "f1"}, "settings")


# prompts --------------------------------------------------------------------------------------

def test_prompts_come_from_the_true_mask_and_are_seeded(kvasir_dir):
    from cqd_mpi.tasks.segmentation import read_mask

    boxes = load_items(kvasir_dir, Settings())
    for item in boxes.values():
        truth = read_mask(item.mask, 127)
        ys, xs = np.nonzero(truth)
        assert item.prompt.box == (xs.min(), ys.min(), xs.max(), ys.max())
    jittered = load_items(kvasir_dir, Settings(box_jitter=0.2, seed=4))
    assert jittered == load_items(kvasir_dir, Settings(box_jitter=0.2, seed=4))
    assert jittered != load_items(kvasir_dir, Settings(box_jitter=0.2, seed=5))
    for item_id, item in jittered.items():
        x0, y0, x1, y1 = item.prompt.box
        assert 0 <= x0 <= x1 < item.size[1] and 0 <= y0 <= y1 < item.size[0]
        assert item.prompt.box != boxes[item_id].prompt.box
    points = load_items(kvasir_dir, Settings(prompt="point", n_points=3))
    for item in points.values():
        truth = read_mask(item.mask, 127)
        assert len(item.prompt.points) == 3 and item.prompt.labels == (1, 1, 1)
        assert all(truth[int(y), int(x)] for x, y in item.prompt.points)
    assert all(item.prompt.kind == "none" for item in load_items(kvasir_dir, Settings(prompt="none")).values())


# capability -----------------------------------------------------------------------------------

class Constant(MaskPrediction):
    def predict_masks(self, images, prompts):
        return [PredictedMask(mask=np.ones(i.shape[:2], bool), iou=0.5) for i in images]


def test_the_task_requires_mask_prediction_and_a_text_engine_is_refused_at_load(sams, kvasir_dir, tmp_path):
    assert task_class("segmentation").requires is MaskPrediction
    config = {
        "base": str(sams["base"]),
        "experts": [{"task": name, "path": str(path)} for name, path in sams["experts"].items()],
        "tasks": [{"name": name, "kind": "segmentation", "data": str(kvasir_dir)} for name in sams["experts"]],
        "qd": {"generations": 2},
        "runtime": {"run_dir": str(tmp_path / "run")},
        "engine": {"kind": "sam", "device": "cpu"},
    }
    assert config_mod.from_dict(config).engine.kind == "sam"
    config["engine"] = {"kind": "transformers"}
    with pytest.raises(ConfigError, match=r"tasks\[0\]: task 'polyp' \(kind 'segmentation'\) needs mask prediction, "
                                          r"which engine 'transformers' .*does not provide \(it provides: text "
                                          r"generation, log-likelihoods\)"):
        config_mod.from_dict(config)
    task = make_task(kvasir_dir, metric="dice")
    assert all(0 < r.score < 1 for r in task.evaluate(Constant(), task.item_ids()))
