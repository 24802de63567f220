"""Synthetic trash dataset: competition format, determinism, classes, masks."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from mask2former.data.catalog import TRASH_CLASSES
from mask2former.data.coco import ValidationPolicy, load_coco_semseg_json
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.synthetic import generate_synthetic_trash

SIZE = 96
SPEC_CATEGORIES = {
    1: "General trash",
    2: "Paper",
    3: "Paper pack",
    4: "Metal",
    5: "Glass",
    6: "Plastic",
    7: "Styrofoam",
    8: "Plastic bag",
    9: "Battery",
    10: "Clothing",
}


def generate(root, seed=0, **kwargs):
    args = dict(
        num_train=10,
        num_val=3,
        num_test=2,
        image_size=SIZE,
        seed=seed,
        objects_per_image=(2, 4),
        images_per_batch=8,
    )
    args.update(kwargs)
    return generate_synthetic_trash(str(root), **args)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "trash"
    assert generate(path) == {"train_all": 13, "train": 10, "val": 3, "test": 2}
    return path


def files_of(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_competition_format(root):
    assert sorted(p.name for p in root.iterdir()) == [
        "batch_01_vt",
        "batch_02_vt",
        "test.json",
        "train.json",
        "train_all.json",
        "val.json",
    ]
    splits = {
        name: json.loads((root / f"{name}.json").read_text())
        for name in ("train_all", "train", "val", "test")
    }
    for data in splits.values():
        assert {c["id"]: c["name"] for c in data["categories"]} == SPEC_CATEGORIES
        assert [img["id"] for img in data["images"]] == list(range(len(data["images"])))
        for img in data["images"]:
            assert re.fullmatch(r"batch_\d\d_vt/\d{4}\.jpg", img["file_name"])
            with Image.open(root / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
            assert (img["width"], img["height"]) == (SIZE, SIZE)
    assert splits["test"]["annotations"] == [] and len(splits["test"]["images"]) == 2
    names = [img["file_name"] for img in splits["train_all"]["images"]]
    assert names == [
        img["file_name"] for img in splits["train"]["images"] + splits["val"]["images"]
    ]
    assert not set(names) & {img["file_name"] for img in splits["test"]["images"]}
    for ann in splits["train_all"]["annotations"]:
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10 and ann["area"] > 0
        assert isinstance(ann["segmentation"], list) and all(
            len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"]
        )
        xy = np.concatenate([np.asarray(p) for p in ann["segmentation"]]).reshape(-1, 2)
        assert xy.min() >= 0 and xy.max() <= SIZE


def test_validator_finds_no_problem(root):
    for split in ("train_all", "test"):
        data = load_coco_semseg_json(
            str(root / f"{split}.json"), str(root), ValidationPolicy(verify_images=True)
        )
        assert not any(data.report.counts.values()), data.report.table()
    assert data.categories.category_id_to_label == {i: i for i in range(1, 11)}


def test_every_class_has_pixels_and_objects_overlap(root):
    data = load_coco_semseg_json(str(root / "train_all.json"), str(root), ValidationPolicy())
    present, overlapping = set(), 0
    for record in data.records:
        label = record_to_label_map(record)
        present |= set(np.unique(label).tolist())
        covered = sum(a["area"] for a in record["annotations"])
        overlapping += covered > 1.02 * (label > 0).sum()
    assert present == set(range(11))
    assert overlapping >= 3


def test_classes_look_different(root):
    """Per-class mean colours are distinct: the classes can be told apart by appearance."""
    data = load_coco_semseg_json(str(root / "train_all.json"), str(root), ValidationPolicy())
    sums, counts = np.zeros((11, 3)), np.zeros(11)
    for record in data.records:
        image = np.asarray(Image.open(record["file_name"]), dtype=np.float64)
        label = record_to_label_map(record)
        for c in np.unique(label):
            sums[c] += image[label == c].sum(0)
            counts[c] += (label == c).sum()
    means = sums[1:] / counts[1:, None]
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(10) * 1e9
    assert distances.min() > 15, np.round(means)


def test_same_seed_is_byte_identical(root, tmp_path):
    again = tmp_path / "again"
    generate(again)
    assert files_of(again) == files_of(root)
    other = tmp_path / "other"
    generate(other, seed=1)
    assert files_of(other)["train.json"] != files_of(root)["train.json"]


def test_atomic_output_folder(tmp_path):
    target = tmp_path / "data"
    generate(target, num_train=1, num_val=1, num_test=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(target, num_train=1, num_val=1, num_test=1)
    generate(target, num_train=2, num_val=1, num_test=1, overwrite=True)
    assert len(json.loads((target / "train.json").read_text())["images"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left
    with pytest.raises(ValueError, match="objects_per_image"):
        generate(tmp_path / "bad", objects_per_image=(3, 1))
    assert TRASH_CLASSES[1:] == tuple(SPEC_CATEGORIES.values())
