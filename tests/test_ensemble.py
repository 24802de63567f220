"""Soft-voting ensemble of probability dumps: weighted vote against numpy, mismatched dumps,
the agreement map, streaming, the post-processing chain, and tools/ensemble.py end to end
(submission, label PNGs, a stacked dump, the LB-style score)."""

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from mask2former.inference.ensemble import SoftVotingEnsemble
from mask2former.inference.pipeline import EnsemblePipeline
from mask2former.inference.prob_dump import ProbDumpReader, ProbDumpWriter
from mask2former.inference.sinks import label_png_path
from mask2former.inference.submission import read_submission
from mask2former.postprocess import agreement_map, normalize_weights, soft_vote
from mask2former.postprocess.crf import CRF_PRESETS, dense_crf
from mask2former.postprocess.mode_filter import mode_filter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Background", "Paper", "Metal", "Glass"]
K = len(CLASSES)


def random_probs(rng, height, width, num_classes=K):
    probs = rng.dirichlet(np.ones(num_classes) * 0.5, size=(height, width))
    return probs.transpose(2, 0, 1).astype(np.float32)


def write_dump(path, maps, classes=CLASSES):
    """maps: {file_name: [K, H, W]} in insertion order."""
    with ProbDumpWriter(str(path), classes) as writer:
        for name, probs in maps.items():
            writer.add(name, probs)
    return str(path)


@pytest.fixture
def three_dumps(tmp_path):
    """Three models' dumps of the same 4 images (different sizes), listed in different orders."""
    rng = np.random.default_rng(0)
    sizes = {"b/0001.jpg": (6, 7), "a/0002.jpg": (5, 9), "a/0003.jpg": (8, 4), "c/0004.jpg": (3, 3)}
    models = [{n: random_probs(rng, *s) for n, s in sizes.items()} for _ in range(3)]
    orders = [list(sizes), list(reversed(sizes)), sorted(sizes)]
    dirs = [
        write_dump(tmp_path / f"m{i}", {n: m[n] for n in order})
        for i, (m, order) in enumerate(zip(models, orders))
    ]
    return dirs, models, list(sizes)


# ------------------------------------------------------------------------------ soft vote


def test_normalize_weights():
    np.testing.assert_allclose(normalize_weights([2, 1, 1], 3), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(normalize_weights(None, 4), [0.25] * 4)
    with pytest.raises(ValueError, match="3 models but 2 weights"):
        normalize_weights([1, 2], 3)
    with pytest.raises(ValueError, match="positive finite"):
        normalize_weights([1, 0, 2], 3)
    with pytest.raises(ValueError, match="positive finite"):
        normalize_weights([1, float("nan")], 2)


def test_weighted_soft_vote_equals_numpy(three_dumps):
    dirs, models, names = three_dumps
    weights = [3.0, 1.0, 0.5]
    ensemble = SoftVotingEnsemble(dirs, weights)
    assert ensemble.class_names == CLASSES
    assert ensemble.file_names == names  # the first dump's order
    seen = []
    for name, probs in ensemble:
        # direct float64 computation from the float16 values the dumps hold
        stored = [m[name].astype(np.float16).astype(np.float64) for m in models]
        expected = sum(w * p for w, p in zip(weights, stored)) / sum(weights)
        assert probs.dtype == np.float32 and probs.shape == expected.shape
        np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
        seen.append(name)
    assert seen == names
    # equal weights by default
    name, probs = next(iter(SoftVotingEnsemble(dirs)))
    expected = np.mean([m[name].astype(np.float16) for m in models], axis=0, dtype=np.float64)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)


def test_soft_vote_function():
    a, b = np.full((2, 1, 1), 0.25, np.float16), np.array([[[1.0]], [[0.0]]], np.float32)
    np.testing.assert_allclose(soft_vote([a, b], [0.75, 0.25]), [[[0.4375]], [[0.1875]]])
    with pytest.raises(ValueError, match="2 weights but 1 probability maps"):
        soft_vote([a], [0.5, 0.5])
    with pytest.raises(ValueError, match="shapes"):
        soft_vote([a, np.zeros((2, 2, 1), np.float32)], [0.5, 0.5])


def test_iterate_in_a_given_order(three_dumps):
    dirs, _, names = three_dumps
    ensemble = SoftVotingEnsemble(dirs)
    order = ensemble.check_file_names(reversed(names), "test.json")
    assert [n for n, _ in ensemble.iterate(order)] == list(reversed(names))


# ------------------------------------------------------------------------------ mismatched dumps


def test_different_images_name_the_dump_and_the_images(three_dumps, tmp_path):
    dirs, models, names = three_dumps
    partial = write_dump(tmp_path / "partial", {n: models[0][n] for n in names[:2]})
    with pytest.raises(ValueError) as info:
        SoftVotingEnsemble([dirs[0], partial])
    message = str(info.value)
    assert partial in message and "2 image(s) missing" in message
    assert "'a/0003.jpg'" in message and "'c/0004.jpg'" in message

    rng = np.random.default_rng(1)
    more = {**{n: models[0][n] for n in names}, "z/9.jpg": random_probs(rng, 2, 2)}
    extra = write_dump(tmp_path / "extra", more)
    with pytest.raises(ValueError, match=r"extra.*1 extra image\(s\): 'z/9.jpg'"):
        SoftVotingEnsemble([dirs[0], extra])


def test_different_classes_or_sizes(three_dumps, tmp_path):
    dirs, models, names = three_dumps
    other_classes = write_dump(tmp_path / "classes", models[0], classes=CLASSES[:3] + ["Plastic"])
    with pytest.raises(ValueError, match="classes differ"):
        SoftVotingEnsemble([dirs[0], other_classes])

    resized = dict(models[0])
    resized["a/0002.jpg"] = random_probs(np.random.default_rng(2), 9, 5)
    other_size = write_dump(tmp_path / "sizes", resized)
    with pytest.raises(ValueError, match=r"sizes.*'a/0002.jpg' \(9, 5\) vs \(5, 9\)"):
        SoftVotingEnsemble([dirs[0], other_size])

    with pytest.raises(ValueError, match="2 models but 3 weights"):
        SoftVotingEnsemble(dirs[:2], [1, 2, 3])
    with pytest.raises(FileNotFoundError, match="index.json"):
        SoftVotingEnsemble([dirs[0], str(tmp_path / "nowhere")])


def test_corrupt_arrays_are_reported(three_dumps):
    dirs, models, names = three_dumps
    index = json.loads(Path(dirs[1], "index.json").read_text())
    files = {entry["file_name"]: os.path.join(dirs[1], entry["path"]) for entry in index["images"]}
    np.save(files["a/0003.jpg"], np.zeros((K, 8, 5), np.float16))  # index says 8 x 4
    ensemble = SoftVotingEnsemble(dirs)
    with pytest.raises(
        ValueError, match=rf"{dirs[1]}: 'a/0003.jpg' holds an array of shape \(4, 8, 5\)"
    ):
        ensemble.vote("a/0003.jpg")
    bad = models[1]["b/0001.jpg"].astype(np.float16)
    bad[0, 0, 0] = np.nan
    np.save(files["b/0001.jpg"], bad)
    message = rf"'b/0001.jpg': NaN or infinite probabilities in the dump\(s\) \['{dirs[1]}'\]"
    with pytest.raises(ValueError, match=message):
        ensemble.vote("b/0001.jpg")


def test_json_images_must_match_the_dumps(three_dumps):
    dirs, _, names = three_dumps
    ensemble = SoftVotingEnsemble(dirs)
    with pytest.raises(
        ValueError, match=r"1 image\(s\) of test.json are not in the dumps: 'x/1.jpg'"
    ):
        ensemble.check_file_names(names + ["x/1.jpg"], "test.json")
    with pytest.raises(
        ValueError, match=r"1 image\(s\) of the dumps are not in test.json: 'c/0004.jpg'"
    ):
        ensemble.check_file_names(names[:3], "test.json")
    with pytest.raises(ValueError, match="listed twice"):
        ensemble.check_file_names(names + names[:1], "test.json")


# ------------------------------------------------------------------------------ agreement map


def test_agreement_of_all_models():
    m1 = np.array([[1, 2, 3, 0]])
    m2 = np.array([[1, 2, 4, 0]])
    m3 = np.array([[1, 5, 3, 0]])
    labels, mask = agreement_map([m1, m2, m3])
    np.testing.assert_array_equal(mask, [[True, False, False, True]])
    np.testing.assert_array_equal(labels[mask], [1, 0])


def test_agreement_of_n_of_m():
    m1 = np.array([[1, 2, 3, 7]], dtype=np.uint8)
    m2 = np.array([[1, 2, 4, 8]], dtype=np.uint8)
    m3 = np.array([[1, 5, 3, 9]], dtype=np.uint8)
    labels, mask = agreement_map([m1, m2, m3], min_agree=2)
    np.testing.assert_array_equal(mask, [[True, True, True, False]])
    np.testing.assert_array_equal(labels[0, :3], [1, 2, 3])
    assert labels.dtype == np.uint8
    # one model is enough: a unique label only when the models do not all differ
    _, mask = agreement_map([m1, m2, m3], min_agree=1)
    np.testing.assert_array_equal(mask, [[True, True, True, False]])


def test_agreement_ties_are_not_agreement():
    """4 models split 2-2: two labels reach min_agree=2, neither is the agreed label."""
    maps = [np.array([[1, 1]]), np.array([[1, 1]]), np.array([[2, 1]]), np.array([[2, 3]])]
    labels, mask = agreement_map(maps, min_agree=2)
    np.testing.assert_array_equal(mask, [[False, True]])
    assert labels[0, 1] == 1


def test_agreement_validation():
    maps = [np.zeros((2, 2), int)] * 3
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match=r"min_agree must be an integer in \[1, 3\]"):
            agreement_map(maps, bad)
    with pytest.raises(ValueError, match="at least one"):
        agreement_map([])


# ------------------------------------------------------------------------------ streaming


class SpyReader(ProbDumpReader):
    """A reader that records every image it loads."""

    def __init__(self, dump_dir, log):
        super().__init__(dump_dir)
        self.log = log

    def get(self, file_name, dtype=np.float32):
        self.log.append((self.dump_dir, file_name))
        return super().get(file_name, dtype)


def test_streams_image_by_image(three_dumps):
    dirs, _, names = three_dumps
    log = []
    ensemble = SoftVotingEnsemble([SpyReader(d, log) for d in dirs])
    stream = iter(ensemble)
    assert log == []  # nothing read before the first image is asked for
    name, probs = next(stream)
    assert log == [(d, names[0]) for d in dirs]  # one map per dump, the first image only
    ref = weakref.ref(probs)
    del probs
    name, probs = next(stream)
    gc.collect()
    assert ref() is None  # the previous image's vote is not kept by the ensemble
    assert log[len(dirs) :] == [(d, names[1]) for d in dirs]
    assert len(log) == 2 * len(dirs)


# ------------------------------------------------------------------------------ pipeline


def test_pipeline_agreement_and_mode_filter_against_numpy(three_dumps):
    dirs, models, names = three_dumps
    weights = [1.0, 2.0, 1.0]
    pipeline = EnsemblePipeline(
        SoftVotingEnsemble(dirs, weights),
        agreement=True,
        min_agree=2,
        apply_mode_filter=True,
        keep_probs=False,
    )
    predictions = list(pipeline.predictions(names[::-1]))
    assert [pred.file_name for pred in predictions] == names[::-1]
    for pred in predictions:
        stored = [m[pred.file_name].astype(np.float16).astype(np.float64) for m in models]
        vote = sum(w * p for w, p in zip(weights, stored)).argmax(0)
        argmaxes = np.stack([p.argmax(0) for p in stored])
        expected = vote.copy()
        height, width = vote.shape
        for y in range(height):
            for x in range(width):
                values, counts = np.unique(argmaxes[:, y, x], return_counts=True)
                if counts.max() >= 2:
                    expected[y, x] = values[counts.argmax()]
        expected = mode_filter(expected)
        np.testing.assert_array_equal(pred.labels, expected)
        assert pred.probs is None and pred.labels.dtype == np.uint8


def test_pipeline_validation(three_dumps):
    ensemble = SoftVotingEnsemble(three_dumps[0])
    with pytest.raises(ValueError, match="needs the images"):
        EnsemblePipeline(ensemble, crf_params=CRF_PRESETS["default"])
    with pytest.raises(ValueError, match="only used with agreement"):
        EnsemblePipeline(ensemble, min_agree=2)
    with pytest.raises(ValueError, match="min_agree"):
        EnsemblePipeline(ensemble, agreement=True, min_agree=4)


def test_crf_image_errors_name_the_file(three_dumps, tmp_path):
    dirs, _, names = three_dumps
    pipeline = EnsemblePipeline(
        SoftVotingEnsemble(dirs), crf_params=CRF_PRESETS["default"], image_root=str(tmp_path)
    )
    with pytest.raises(
        FileNotFoundError, match=r"'b/0001.jpg': no image .*b/0001.jpg \(check --image-root"
    ):
        pipeline.predict("b/0001.jpg")
    os.makedirs(tmp_path / "b")
    cv2.imwrite(str(tmp_path / "b" / "0001.jpg"), np.zeros((7, 6, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"0001.jpg: image is 7x6 but the probabilities of 'b/0001.jpg' are"
    ):
        pipeline.predict("b/0001.jpg")


def test_label_png_path():
    assert label_png_path("out", "batch_01_vt/0002.jpg") == os.path.join(
        "out", "batch_01_vt", "0002.jpg.png"
    )
    # one stem, two extensions: two label files
    assert label_png_path("out", "img/one.jpg") != label_png_path("out", "img/one.png")
    with pytest.raises(ValueError, match="not a relative path"):
        label_png_path("out", "../x.jpg")


# ------------------------------------------------------------------------------ the tool


IMAGES = [  # test.json order: neither sorted by name nor by id
    {"id": 7, "file_name": "batch_02/0001.png", "height": 24, "width": 32},
    {"id": 2, "file_name": "batch_01/0005.png", "height": 20, "width": 28},
    {"id": 4, "file_name": "batch_01/0002.png", "height": 24, "width": 32},
]
COLORS = [(90, 90, 90), (230, 230, 220), (150, 40, 40), (40, 150, 60)]


def rectangle(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_split(root, rng):
    """Images (flat colour per class + noise), COCO json with non-overlapping rectangles, and
    the ground-truth label maps decoded with pycocotools (the reference)."""
    annotations, truths = [], {}
    for image in IMAGES:
        height, width = image["height"], image["width"]
        boxes = [(1, (2, 2, 12, 10)), (2, (15, 4, 26, 16)), (3, (4, 13, 11, 19))]
        truth = np.zeros((height, width), np.uint8)
        for category, box in boxes:
            segmentation = rectangle(*box)
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
            truth[mask_util.decode(rle).astype(bool)] = category
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask_util.area(rle)),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "iscrowd": 0,
                }
            )
        picture = np.array(COLORS, np.float64)[truth] + rng.normal(0, 6, (height, width, 3))
        path = root / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.clip(picture, 0, 255).astype(np.uint8)[:, :, ::-1])
        truths[image["file_name"]] = truth
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES) if i > 0]
    json_file = root / "test.json"
    json_file.write_text(
        json.dumps({"images": IMAGES, "annotations": annotations, "categories": categories})
    )
    return json_file, truths


def model_probs(truth, rng, accuracy):
    """Probabilities of a model that is right on about ``accuracy`` of the pixels."""
    labels = truth.copy()
    wrong = rng.random(truth.shape) > accuracy
    labels[wrong] = rng.integers(0, K, int(wrong.sum()))
    probs = rng.uniform(0.0, 0.3, (K,) + truth.shape)
    np.put_along_axis(
        probs, labels[None].astype(np.int64), rng.uniform(0.5, 1.0, truth.shape)[None], axis=0
    )
    return (probs / probs.sum(0)).astype(np.float32)


def run_tool(*args, cwd):
    cmd = [sys.executable, str(ROOT / "tools" / "ensemble.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def hand_score(truths, predictions):
    """LB-style mIoU written out: one confusion over all images, IoU per class present in GT or
    prediction, mean of those."""
    ious = {}
    for c in range(K):
        tp = sum(int(((truths[n] == c) & (predictions[n] == c)).sum()) for n in truths)
        fp = sum(int(((truths[n] != c) & (predictions[n] == c)).sum()) for n in truths)
        fn = sum(int(((truths[n] == c) & (predictions[n] != c)).sum()) for n in truths)
        if tp + fp + fn:
            ious[CLASSES[c]] = tp / (tp + fp + fn)
    total = sum(t.size for t in truths.values())
    correct = sum(int((truths[n] == predictions[n]).sum()) for n in truths)
    return ious, float(np.mean(list(ious.values()))), correct / total


def nearest_256(labels):
    """Submission resize, written independently: out[i, j] = in[floor(i*H/256), floor(j*W/256)]."""
    height, width = labels.shape
    return labels[(np.arange(256) * height) // 256][:, (np.arange(256) * width) // 256]


def test_tool_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    json_file, truths = make_split(data, rng)
    names = [image["file_name"] for image in IMAGES]
    dumps = [
        write_dump(
            tmp_path / f"model{i}", {n: model_probs(truths[n], rng, acc) for n in sorted(names)}
        )
        for i, acc in enumerate((0.8, 0.7, 0.75))
    ]
    out = tmp_path / "out"

    # 1. three dumps -> CRF -> agreement of 2 of 3 -> every output, in 2 worker processes
    run_tool(
        "--dumps",
        *dumps,
        "--weights",
        2,
        1,
        1,
        "--json",
        json_file,
        "--crf",
        "default",
        "--crf-iters",
        3,
        "--agreement-overwrite",
        "--min-agree",
        2,
        "--workers",
        2,
        "--submission",
        out / "submission.csv",
        "--labels",
        out / "labels",
        "--probs",
        out / "stacked",
        "--score",
        "--score-dir",
        out / "score",
        cwd=tmp_path,
    )

    # the same chain in this process, one image at a time
    pipeline = EnsemblePipeline(
        SoftVotingEnsemble(dumps, [2, 1, 1]),
        crf_params=CRF_PRESETS["default"],
        crf_iterations=3,
        agreement=True,
        min_agree=2,
        image_root=str(data),
    )
    expected = {p.file_name: p for p in pipeline.predictions(names)}
    labels = {
        n: cv2.imread(label_png_path(str(out / "labels"), n), cv2.IMREAD_UNCHANGED) for n in names
    }
    for n in names:
        np.testing.assert_array_equal(labels[n], expected[n].labels)
    # the CRF did something, and the agreement overwrite too
    votes = {n: pipeline.ensemble.vote(n) for n in names}
    crf_only = {
        n: dense_crf(pipeline.read_image(n), votes[n], "default", 3).argmax(0) for n in names
    }
    assert any((crf_only[n] != votes[n].argmax(0)).any() for n in names)
    assert any((crf_only[n] != labels[n]).any() for n in names)

    ids, masks = read_submission(str(out / "submission.csv"))
    assert ids == names  # test.json order
    for n, mask in zip(ids, masks):
        np.testing.assert_array_equal(mask, nearest_256(labels[n]))

    stacked = ProbDumpReader(str(out / "stacked"))
    assert stacked.class_names == CLASSES and sorted(stacked.file_names) == sorted(names)
    for n in names:
        np.testing.assert_allclose(stacked.get(n), expected[n].probs, atol=1e-3)

    ious, miou, pixel_acc = hand_score(truths, labels)
    metrics = json.loads((out / "score" / "lb_metrics.json").read_text())
    assert metrics["metrics"]["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert metrics["metrics"]["pACC"] == pytest.approx(pixel_acc, abs=1e-12)
    for row in metrics["per_class"]:
        assert row["IoU"] == pytest.approx(ious[row["class"]], abs=1e-12)
    assert 0.5 < miou < 1.0

    # 2. stacking: the new dump with one of the models, through a registered dataset, no CRF
    run_tool(
        "--dumps",
        out / "stacked",
        dumps[0],
        "--weights",
        3,
        1,
        "--dataset",
        "stack_val",
        "--mode-filter",
        "--labels",
        out / "labels2",
        "--score",
        "--score-dir",
        out / "score2",
        "DATASETS.COCO_SEMSEG",
        f"[['stack_val', '{json_file}', '{data}']]",
        cwd=tmp_path,
    )
    predictions = {}
    for n in names:
        vote = 3 * stacked.get(n).astype(np.float64) + ProbDumpReader(dumps[0]).get(n).astype(
            np.float64
        )
        predictions[n] = mode_filter(vote.argmax(0).astype(np.uint8))
        written = cv2.imread(label_png_path(str(out / "labels2"), n), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(written, predictions[n])
    _, miou2, _ = hand_score(truths, predictions)
    metrics2 = json.loads((out / "score2" / "lb_metrics.json").read_text())
    assert metrics2["metrics"]["mIoU"] == pytest.approx(miou2, abs=1e-12)
