"""LB-style evaluator: hand-computed confusion matrices and metrics, the DatasetEvaluator API on
tiny registered datasets, output files, and gathering across two gloo processes."""

import json
import math
import os
import pickle
import uuid

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog

from mask2former.evaluation import (
    LBSemSegEvaluator,
    class_iou,
    confusion_matrix,
    metrics_from_confusion_matrix,
    nanmean,
)

CLASSES = ["Background", "Paper", "Metal", "Glass", "Plastic"]
IGNORE = 255

# Hand example. Image 1: the Glass (3) prediction sits on an ignore pixel, so Glass is absent
# from both GT and prediction once ignore pixels are excluded -> NaN, left out of the mean.
GT1 = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE]])
PRED1 = np.array([[0, 1, 1, 1], [0, 0, 2, 3]])
# Image 2: Plastic (4) is in the GT and never predicted -> IoU 0, counted.
GT2 = np.array([[2, 2, 2], [0, 0, 4]])
PRED2 = np.array([[0, 0, 2], [0, 0, 1]])

CM1 = np.array(
    [
        [2, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)
CM2 = np.array(
    [
        [2, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [2, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
    ]
)
# Totals: TP = [4, 2, 2, 0, 0], GT = [5, 2, 5, 0, 1], predicted = [7, 4, 2, 0, 0], 13 pixels.
IOU = [4 / 8, 2 / 4, 2 / 5, math.nan, 0.0]
MIOU = (0.5 + 0.5 + 0.4 + 0.0) / 4  # 0.35; without background it would be 0.3
PACC = 8 / 13
MACC = (4 / 5 + 2 / 2 + 2 / 5 + 0 / 1) / 4
FWIOU = (5 * 0.5 + 2 * 0.5 + 5 * 0.4 + 1 * 0.0) / 13
# Per image: image 1 IoU = [2/4, 2/3, 1/2, nan, nan] -> 5/9;
# image 2 IoU = [2/4, 0/1 (predicted, not in GT), 1/3, nan, 0/1] -> 5/24.
MIOU_PER_IMAGE = (5 / 9 + 5 / 24) / 2


def one_hot_scores(pred, num_classes=len(CLASSES)):
    """[K, H, W] float scores whose argmax is ``pred``."""
    return F.one_hot(torch.as_tensor(pred), num_classes).permute(2, 0, 1).float()


def write_png(path, array):
    assert cv2.imwrite(str(path), np.asarray(array, dtype=np.uint8))


def register(records, classes=CLASSES, **metadata):
    """Register a test-only dataset under a unique name; returns the name."""
    name = f"test_lb_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=IGNORE, **metadata)
    return name


def unregister(name):
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def make_records(directory, gts, write_labels=True):
    """Label-map PNG records (the image files themselves are never read by the evaluator)."""
    records = []
    for i, gt in enumerate(gts):
        label_path = os.path.join(directory, f"label_{i}.png")
        if write_labels:
            write_png(label_path, gt)
        records.append(
            {
                "file_name": os.path.join(directory, f"image_{i}.jpg"),
                "sem_seg_file_name": label_path,
                "image_id": i,
                "height": gt.shape[0],
                "width": gt.shape[1],
            }
        )
    return records


@pytest.fixture
def hand_dataset(tmp_path):
    records = make_records(str(tmp_path), [GT1, GT2])
    name = register(records)
    yield name, records
    unregister(name)


def run(evaluator, records, preds, batch_size=1):
    evaluator.reset()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = [{k: r[k] for k in ("file_name", "image_id", "height", "width")} for r in batch]
        outputs = [{"sem_seg": one_hot_scores(p)} for p in preds[start : start + batch_size]]
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


# ------------------------------------------------------------------------------ pure functions


def test_confusion_matrix_hand_examples():
    np.testing.assert_array_equal(confusion_matrix(GT1, PRED1, 5, IGNORE), CM1)
    np.testing.assert_array_equal(confusion_matrix(GT2, PRED2, 5, IGNORE), CM2)
    assert confusion_matrix(GT1, PRED1, 5, IGNORE).dtype == np.int64
    # Without an ignore label, 255 is an out-of-range ground-truth label.
    with pytest.raises(ValueError, match="ground-truth label out of range"):
        confusion_matrix(GT1, PRED1, 5)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="predicted label out of range"):
        confusion_matrix(GT2, PRED2 + 4, 5, IGNORE)
    with pytest.raises(ValueError, match="ground-truth label out of range"):
        confusion_matrix(np.array([[7]]), np.array([[0]]), 5, IGNORE)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(GT1, PRED2, 5, IGNORE)
    # Everything ignored: an empty matrix, not an error.
    all_ignored = np.full((2, 2), IGNORE)
    np.testing.assert_array_equal(
        confusion_matrix(all_ignored, np.zeros((2, 2), int), 3, IGNORE), np.zeros((3, 3))
    )


def test_metrics_from_confusion_matrix_hand_example():
    m = metrics_from_confusion_matrix(CM1 + CM2)
    np.testing.assert_allclose(m["IoU"], IOU)  # NaN positions must match too
    np.testing.assert_allclose(m["ACC"], [4 / 5, 1.0, 2 / 5, math.nan, 0.0])
    assert m["mIoU"] == pytest.approx(MIOU)
    assert m["pACC"] == pytest.approx(PACC)
    assert m["mACC"] == pytest.approx(MACC)
    assert m["fwIoU"] == pytest.approx(FWIOU)
    np.testing.assert_array_equal(m["gt_pixels"], [5, 2, 5, 0, 1])
    np.testing.assert_array_equal(m["pred_pixels"], [7, 4, 2, 0, 0])
    assert nanmean(class_iou(CM1)) == pytest.approx(5 / 9)
    assert nanmean(class_iou(CM2)) == pytest.approx(5 / 24)


def test_metrics_of_an_empty_matrix_are_nan():
    m = metrics_from_confusion_matrix(np.zeros((3, 3), dtype=np.int64))
    assert all(math.isnan(m[k]) for k in ("mIoU", "pACC", "mACC", "fwIoU"))


# ------------------------------------------------------------------------------ evaluator


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluator_hand_example(hand_dataset, tmp_path, batch_size):
    name, records = hand_dataset
    out_dir = tmp_path / "eval"
    evaluator = LBSemSegEvaluator(name, output_dir=str(out_dir))
    results = run(evaluator, records, [PRED1, PRED2], batch_size)

    assert list(results) == ["sem_seg"]
    res = results["sem_seg"]
    assert list(res)[:5] == ["mIoU", "mIoU_per_image", "pACC", "mACC", "fwIoU"]
    assert res["mIoU"] == pytest.approx(MIOU)
    assert res["mIoU_per_image"] == pytest.approx(MIOU_PER_IMAGE)
    assert res["pACC"] == pytest.approx(PACC)
    assert res["mACC"] == pytest.approx(MACC)
    assert res["fwIoU"] == pytest.approx(FWIOU)
    assert [k for k in res if k.startswith("IoU-")] == [f"IoU-{c}" for c in CLASSES]
    np.testing.assert_allclose([res[f"IoU-{c}"] for c in CLASSES], IOU)
    assert math.isnan(res["IoU-Glass"])  # only predicted on an ignore pixel
    assert res["IoU-Plastic"] == 0.0  # in GT, never predicted
    assert res["IoU-Background"] == 0.5  # background is a class

    doc = json.loads((out_dir / "lb_metrics.json").read_text())
    np.testing.assert_array_equal(doc["confusion_matrix"], CM1 + CM2)
    assert doc["class_names"] == CLASSES
    assert doc["num_images"] == 2
    assert doc["metrics"]["IoU-Glass"] is None  # NaN is written as null
    assert doc["metrics"]["mIoU"] == pytest.approx(MIOU)
    assert [c["gt_pixels"] for c in doc["per_class"]] == [5, 2, 5, 0, 1]
    assert [c["pred_pixels"] for c in doc["per_class"]] == [7, 4, 2, 0, 0]
    assert [p["file_name"] for p in doc["per_image"]] == [r["file_name"] for r in records]
    assert [p["mIoU"] for p in doc["per_image"]] == pytest.approx([5 / 9, 5 / 24])
    picture = cv2.imread(str(out_dir / "confusion_matrix.png"))
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 100
    assert sorted(os.listdir(out_dir)) == ["confusion_matrix.png", "lb_metrics.json"]


def test_evaluator_order_of_arrival_does_not_matter(hand_dataset):
    name, records = hand_dataset
    evaluator = LBSemSegEvaluator(name, distributed=False)
    forward = run(evaluator, records, [PRED1, PRED2])["sem_seg"]
    backward = run(evaluator, records[::-1], [PRED2, PRED1])["sem_seg"]  # reset() between runs
    np.testing.assert_equal(dict(forward), dict(backward))
    assert forward["mIoU"] == pytest.approx(MIOU)


def test_custom_gt_loader(tmp_path):
    records = [
        {"file_name": f"mem_{i}.jpg", "image_id": i, "height": 2, "width": w}
        for i, w in ((0, 4), (1, 3))
    ]
    name = register(records)
    try:
        gts = {0: GT1, 1: GT2}
        evaluator = LBSemSegEvaluator(name, gt_loader=lambda record: gts[record["image_id"]])
        res = run(evaluator, records, [PRED1, PRED2])["sem_seg"]
    finally:
        unregister(name)
    assert res["mIoU"] == pytest.approx(MIOU)


@pytest.mark.parametrize("draw_order, metal_iou", [("area_desc", 0.0), ("file", math.nan)])
def test_default_gt_loader_rasterises_polygons_in_the_dataset_draw_order(draw_order, metal_iou):
    """A small Metal square listed before a Paper square covering the whole image: drawn largest
    first it stays visible (GT Metal never predicted -> 0), in file order it is painted over."""
    small = {"category_id": 2, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]], "iscrowd": 0}
    large = {"category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "iscrowd": 0}
    record = {
        "file_name": "poly.jpg",
        "image_id": 0,
        "height": 10,
        "width": 10,
        "annotations": [small, large],
    }
    name = register([record], draw_order=draw_order)
    try:
        res = run(LBSemSegEvaluator(name), [record], [np.ones((10, 10), dtype=np.int64)])
    finally:
        unregister(name)
    np.testing.assert_equal(res["sem_seg"]["IoU-Metal"], metal_iou)
    assert res["sem_seg"]["IoU-Paper"] > 0.8


def test_tied_scores_go_to_the_first_class(hand_dataset):
    name, records = hand_dataset
    evaluator = LBSemSegEvaluator(name)
    evaluator.reset()
    scores = torch.zeros(len(CLASSES), 2, 3)
    scores[1:3] = 1.0  # Paper and Metal tie everywhere -> Paper
    inputs = [{k: records[1][k] for k in ("file_name", "image_id", "height", "width")}]
    evaluator.process(inputs, [{"sem_seg": scores}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["IoU-Paper"] == 0.0  # predicted everywhere, absent from GT
    assert res["IoU-Metal"] == 0.0  # would be 3/6 if ties went to Metal
    assert res["pACC"] == 0.0


def test_evaluator_without_plot_and_without_predictions(hand_dataset, tmp_path):
    name, records = hand_dataset
    evaluator = LBSemSegEvaluator(name, output_dir=str(tmp_path / "e"), plot_confusion_matrix=False)
    run(evaluator, records, [PRED1, PRED2])
    assert os.listdir(tmp_path / "e") == ["lb_metrics.json"]
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_size_mismatch_names_the_image(hand_dataset):
    name, records = hand_dataset
    evaluator = LBSemSegEvaluator(name)
    evaluator.reset()
    inputs = [{"file_name": records[1]["file_name"], "image_id": 1, "height": 2, "width": 3}]
    with pytest.raises(ValueError, match=r"image_1\.jpg.* is 4x6 but its ground truth is 2x3"):
        evaluator.process(inputs, [{"sem_seg": torch.zeros(len(CLASSES), 4, 6)}])
    with pytest.raises(ValueError, match=r"shape \(3, 2, 3\), expected \[5, H, W\]"):
        evaluator.process(inputs, [{"sem_seg": torch.zeros(3, 2, 3)}])
    with pytest.raises(KeyError, match="not_in_dataset.jpg"):
        evaluator.process(
            [{"file_name": "not_in_dataset.jpg"}], [{"sem_seg": torch.zeros(5, 2, 3)}]
        )


def test_dataset_without_ground_truth_is_refused(tmp_path):
    name = register(make_records(str(tmp_path), [GT2]), has_ground_truth=False)
    try:
        with pytest.raises(ValueError, match="no ground truth"):
            LBSemSegEvaluator(name)
    finally:
        unregister(name)


# ------------------------------------------------------------------------------ two processes


def random_split(directory, seed, write_labels, num_images=7):
    """Records of random label maps (several sizes, some ignore pixels) and random predictions
    that agree with the GT on about 70% of pixels; class 4 never appears anywhere."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(num_images):
        h, w = 5 + i, 9 - i % 3
        gt = rng.integers(0, 4, size=(h, w))
        gt[rng.random((h, w)) < 0.1] = IGNORE
        pred = np.where(rng.random((h, w)) < 0.7, gt % IGNORE, rng.integers(0, 4, size=(h, w)))
        pred[gt == IGNORE] = rng.integers(0, 4, size=int((gt == IGNORE).sum()))
        gts.append(gt)
        preds.append(pred)
    return make_records(directory, gts, write_labels), preds


def _distributed_worker(rank, world_size, init_method, data_dir, dataset_seed, result_dir):
    # Forked after the parent used torch's OpenMP pool: one thread, as DataLoader workers do,
    # or the first parallel op can hang.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        records, preds = random_split(data_dir, dataset_seed, write_labels=False)
        name = register(records)
        evaluator = LBSemSegEvaluator(
            name, distributed=True, output_dir=os.path.join(result_dir, "eval")
        )
        results = run(evaluator, records[rank::world_size], preds[rank::world_size])
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    records, preds = random_split(str(data_dir), seed=3, write_labels=True)
    name = register(records)
    try:
        single = run(LBSemSegEvaluator(name, distributed=True), records, preds)
    finally:
        unregister(name)
    assert math.isnan(single["sem_seg"]["IoU-Plastic"])

    init_method = f"file://{tmp_path / 'pg_init'}"
    # fork: the workers inherit the imported modules (spawn would re-import torch twice).
    mp.start_processes(
        _distributed_worker,
        args=(2, init_method, str(data_dir), 3, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    with open(tmp_path / "rank0.pkl", "rb") as f:
        rank0 = pickle.load(f)
    with open(tmp_path / "rank1.pkl", "rb") as f:
        rank1 = pickle.load(f)
    assert rank1 is None  # only the main process returns results
    np.testing.assert_equal(dict(rank0["sem_seg"]), dict(single["sem_seg"]))
    doc = json.loads((tmp_path / "eval" / "lb_metrics.json").read_text())
    assert doc["num_images"] == len(records)
    assert [p["file_name"] for p in doc["per_image"]] == [r["file_name"] for r in records]
    expected_cm = sum(
        confusion_matrix(cv2.imread(r["sem_seg_file_name"], cv2.IMREAD_UNCHANGED), p, 5, IGNORE)
        for r, p in zip(records, preds)
    )
    np.testing.assert_array_equal(doc["confusion_matrix"], expected_cm)
