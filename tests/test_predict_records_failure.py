"""predict_records on an image that cannot be decoded: the error names the file, and the sinks'
outputs keep their previous content (nothing half-written)."""

import os

import cv2
import numpy as np
import pytest
import torch

from mask2former.data.coco.images import UnreadableImageError
from mask2former.inference.predictor import predict_records
from mask2former.inference.sinks import ProbDumpSink, SubmissionSink

CLASSES = ["Background", "a", "b"]


def constant_predictor(image):
    probs = torch.zeros(len(CLASSES), *image.shape[:2])
    probs[1] = 1.0
    return probs


def write_images(folder, count):
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        path = os.path.join(folder, f"{i}.jpg")
        cv2.imwrite(path, rng.integers(0, 255, (16, 12, 3), dtype=np.uint8))
        records.append({"file_name": path, "image_id": i, "height": 16, "width": 12})
    return records


def run(records, tmp_path):
    names = {r["image_id"]: os.path.basename(r["file_name"]) for r in records}
    sinks = [
        SubmissionSink(str(tmp_path / "sub.csv"), [names[r["image_id"]] for r in records]),
        ProbDumpSink(str(tmp_path / "probs"), CLASSES),
    ]
    return predict_records(constant_predictor, records, names, sinks, progress=False)


def test_unreadable_image_is_named_and_previous_outputs_are_kept(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = write_images(str(images), 3)
    run(records, tmp_path)  # a complete previous result
    before = {
        p: open(p, "rb").read()
        for p in [str(tmp_path / "sub.csv")]
        + [str(tmp_path / "probs" / n) for n in sorted(os.listdir(tmp_path / "probs"))]
    }
    bad = records[1]["file_name"]
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(UnreadableImageError) as info:
        run(records, tmp_path)
    assert bad in str(info.value)
    after = {p: open(p, "rb").read() for p in before}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["images", "probs", "sub.csv"]  # no temporaries
    assert sorted(os.listdir(tmp_path / "probs")) == sorted(
        os.path.basename(p) for p in before if "probs" in p
    )
