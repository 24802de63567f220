"""The project's train loader under ``DATALOADER.FILTER_EMPTY_ANNOTATIONS True``: COCO + pseudo
label splits in both orders, empty records dropped with their semantic-segmentation meaning."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from mask2former.data.catalog import (
    TRASH_CLASSES,
    register_coco_semseg,
    register_datasets_from_cfg,
    register_trash_dataset,
)
from mask2former.data.catalog.pseudo import register_pseudo_label_dataset
from mask2former.data.catalog.train_records import has_ground_truth, train_dataset_records
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import Trainer, get_project_cfg
from mask2former.engine.checks import check_num_classes
from mask2former.inference.pseudo_label_writer import PseudoLabelWriter

PREFIX = "trec"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_records") / "data"
    generate_synthetic_trash(str(root), num_train=3, num_val=1, num_test=2, image_size=32, seed=0)
    # one train image loses its annotations: an empty record under the filter
    train = json.loads((root / "train.json").read_text())
    first = train["images"][0]["id"]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] != first]
    (root / "train.json").write_text(json.dumps(train))
    out = root.parent / "pseudo"
    rng = np.random.default_rng(0)
    with PseudoLabelWriter(
        str(out), str(root / "test.json"), TRASH_CLASSES, 0.5, image_root=str(root)
    ) as w:
        for name in w.file_names:
            probs = np.full((len(TRASH_CLASSES), 32, 32), 0.01)
            probs[rng.integers(0, len(TRASH_CLASSES))] = 0.9
            w.add(name, probs)
    register_trash_dataset(str(root), prefix=PREFIX)
    register_pseudo_label_dataset(f"{PREFIX}_pseudo", str(out / "pseudo.json"), str(root))
    yield root
    for name in list(DatasetCatalog.list()):
        if name.startswith(PREFIX + "_"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_has_ground_truth():
    assert has_ground_truth({"sem_seg_file_name": "a.png"})
    assert has_ground_truth({"annotations": [{"iscrowd": 0}]})
    assert not has_ground_truth({"annotations": [{"iscrowd": 1}]})
    assert not has_ground_truth({"annotations": []})
    assert not has_ground_truth({"file_name": "a.jpg"})


@pytest.mark.parametrize("order", [("train", "pseudo"), ("pseudo", "train")])
def test_filter_keeps_pseudo_records_in_any_order(datasets, order):
    names = [f"{PREFIX}_{n}" for n in order]
    records = train_dataset_records(names, filter_empty=True)
    pseudo = [r for r in records if "sem_seg_file_name" in r]
    coco = [r for r in records if "sem_seg_file_name" not in r]
    assert len(pseudo) == 2 and len(coco) == 2  # the train image without annotations dropped
    assert all(r["annotations"] for r in coco)
    assert len(train_dataset_records(names, filter_empty=False)) == 5


@pytest.mark.parametrize("order", [("train", "pseudo"), ("pseudo", "train")])
def test_trainer_train_loader_draws_a_batch(datasets, order):
    cfg = get_project_cfg()
    cfg.DATASETS.TRAIN = tuple(f"{PREFIX}_{n}" for n in order)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert len(batch) == 4
    assert all(d["sem_seg"].shape == (32, 32) for d in batch)


@pytest.fixture
def trash_names():
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_corrupt_unused_split_does_not_block_training(tmp_path, trash_names):
    root = tmp_path / "data"
    generate_synthetic_trash(str(root), num_train=2, num_val=1, num_test=1, image_size=32, seed=0)
    (root / "test.json").write_text('{"images": [')  # truncated
    cfg = get_project_cfg()
    cfg.DATASETS.TRASH_ROOT = str(root)
    trash_names.extend(register_datasets_from_cfg(cfg))
    assert "trash_test" in trash_names
    assert len(train_dataset_records(["trash_train"], filter_empty=True)) == 2
    with pytest.raises(ValueError, match=r"test\.json: not valid JSON"):
        DatasetCatalog.get("trash_test")


def test_corrupt_coco_json_fails_when_loaded_naming_the_file(tmp_path):
    bad = tmp_path / "extra.json"
    bad.write_text('{"images": [], "categories": [{"id": 1}]}')  # a category without a name
    register_coco_semseg("trec_extra", str(bad), str(tmp_path))
    try:
        meta = MetadataCatalog.get("trec_extra")
        assert meta.get("stuff_classes", None) is None  # not an empty class list
        check_num_classes(11, ["trec_extra"])  # leaves the error to the loader
        with pytest.raises(ValueError, match=r"extra\.json: invalid category entry"):
            DatasetCatalog.get("trec_extra")
    finally:
        DatasetCatalog.remove("trec_extra")
        MetadataCatalog.remove("trec_extra")
