"""Train mapper with the real copy-paste sampler: a bank record drawn again maps as the first
time (the mapper never modifies the sampler's cached records nor the dataset's)."""

import copy

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from mask2former.data import register_trash_dataset
from mask2former.data.augmentation.copy_paste import CopyPasteSampler, generate_bank
from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from mask2former.data.offline.synthetic import generate_synthetic_trash


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_trash(
        str(root / "data"), num_train=4, num_val=1, num_test=1, image_size=48, seed=5
    )
    register_trash_dataset(str(root / "data"), prefix="mapper_cp_test")
    yield DatasetCatalog.get("mapper_cp_test_train")
    for split in ("train_all", "train", "val", "test"):
        DatasetCatalog.remove(f"mapper_cp_test_{split}")


def _mapper(copy_paste):
    return MaskFormerSemanticDatasetMapper(
        True,
        augmentations=[],
        image_format="RGB",
        ignore_label=255,
        size_divisibility=-1,
        copy_paste=copy_paste,
    )


def test_bank_record_drawn_again_maps_the_same(train_records, tmp_path):
    folder = generate_bank(train_records, str(tmp_path / "bank"), 1, seed=0)
    label_png = np.asarray(Image.open(f"{folder}/labels/000000.png"))
    image_jpg = np.asarray(Image.open(f"{folder}/images/000000.jpg").convert("RGB"))
    assert len(np.unique(label_png)) > 1  # pasted objects on a background
    sampler = CopyPasteSampler(str(tmp_path / "bank"), 1.0)
    mapper = _mapper(sampler)
    record = train_records[0]
    record_before = copy.deepcopy(record)
    outputs = [mapper(record) for _ in range(3)]
    for out in outputs:
        assert out["image_id"] == "copy_paste/v0000/0"
        np.testing.assert_array_equal(out["sem_seg"].numpy(), label_png)
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image_jpg)
        classes = sorted(int(v) for v in np.unique(label_png) if v != 255)
        assert out["instances"].gt_classes.tolist() == classes
    assert outputs[0] is not outputs[1]
    # the bank record the sampler hands out (its cached one) is as read from the bank json
    assert sorted(sampler.maybe_sample(record, np.random.default_rng(0))) == [
        "file_name", "height", "image_id", "sem_seg_file_name", "width",
    ]  # fmt: skip
    assert record == record_before


def test_training_record_is_not_modified(train_records, tmp_path):
    mapper = _mapper(CopyPasteSampler(str(tmp_path / "no_bank"), 1.0))  # no bank: no draw
    record = train_records[1]
    record_before = copy.deepcopy(record)
    out = mapper(record)
    assert out["image_id"] == record["image_id"] and "annotations" not in out
    assert record == record_before
