"""COCO datasets whose uncovered pixels are ignored: CamVid label maps -> COCO json
(--no-background) -> registration with "ignore" rasterises back to the original label maps
(Unlabelled -> ignore), through the train mapper, the evaluator and the copy-paste bank."""

import json
from pathlib import Path

import numpy as np
import pytest
from camvid import CAMVID_CLASSES, CAMVID_ROOT, CAMVID_UNLABELLED
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from mask2former.data.augmentation.copy_paste import generate_bank, read_current_bank
from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from mask2former.data.catalog import register_coco_semseg, register_datasets_from_cfg
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.convert_labelmaps import labelmaps_to_coco
from mask2former.engine import get_project_cfg
from mask2former.evaluation import LBSemSegEvaluator

CAMVID = CAMVID_ROOT / "val"
CLASSES = CAMVID_CLASSES
UNLABELLED, IGNORE = CAMVID_UNLABELLED, 255

pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """3 CamVid val label maps converted without background; the original PNGs by file name."""
    base = tmp_path_factory.mktemp("camvid_ignore")
    labels = base / "labels"
    labels.mkdir()
    names = sorted(p.name for p in (CAMVID / "labels").iterdir())[:3]
    originals = {}
    for name in names:
        (labels / name).write_bytes((CAMVID / "labels" / name).read_bytes())
        originals[name.replace(".png", ".jpg")] = np.asarray(Image.open(labels / name))
    out = base / "camvid.json"
    labelmaps_to_coco(
        str(labels),
        str(out),
        CLASSES,
        image_dir=str(CAMVID / "images"),
        ignore_label=UNLABELLED,
        background=None,
    )
    yield out, originals
    for name in list(DatasetCatalog.list()):
        if name.startswith("cvi_"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _register(json_file, *uncovered):
    cfg = get_project_cfg()
    cfg.DATASETS.COCO_SEMSEG = [["cvi_val", str(json_file), str(CAMVID / "images"), *uncovered]]
    register_datasets_from_cfg(cfg)
    return cfg


@pytest.mark.parametrize("uncovered", [("ignore",), ()])  # given, or read from the json's info
def test_round_trip_to_the_original_label_maps(camvid, uncovered):
    json_file, originals = camvid
    assert json.loads(json_file.read_text())["info"]["uncovered"] == "ignore"
    _register(json_file, *uncovered)
    meta = MetadataCatalog.get("cvi_val")
    assert meta.stuff_classes == CLASSES and meta.uncovered == "ignore"
    records = DatasetCatalog.get("cvi_val")
    assert len(records) == 3
    for record in records:
        expected = originals[Path(record["file_name"]).name].astype(np.int64)
        assert (expected == UNLABELLED).any()
        expected[expected == UNLABELLED] = IGNORE
        np.testing.assert_array_equal(record_to_label_map(record), expected)


def test_contradicting_choice_is_refused(camvid):
    json_file, _ = camvid
    with pytest.raises(ValueError, match="camvid.json: uncovered must be one of"):
        register_coco_semseg("cvi_bad", str(json_file), str(CAMVID / "images"), uncovered="x")
    with pytest.raises(ValueError, match="registration asks for 'background'"):
        _register(json_file, "background")


def test_train_mapper_and_evaluator_ignore_uncovered_pixels(camvid):
    json_file, originals = camvid
    cfg = _register(json_file, "ignore")
    record = DatasetCatalog.get("cvi_val")[0]
    original = originals[Path(record["file_name"]).name]
    cfg.INPUT.MIN_SIZE_TRAIN = (original.shape[0],)
    cfg.INPUT.MAX_SIZE_TRAIN = 10000
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    sem_seg = MaskFormerSemanticDatasetMapper(cfg, True)(record)["sem_seg"].numpy()
    unlabelled = original == UNLABELLED
    assert sem_seg.shape == original.shape
    flipped = sem_seg if ((sem_seg == IGNORE) == unlabelled).all() else sem_seg[:, ::-1]
    assert ((flipped == IGNORE) == unlabelled).all()  # the random flip undone

    # the prediction is right wherever the ground truth is labelled and wrong on Unlabelled
    pred = original.astype(np.int64)
    pred[original == UNLABELLED] = 0
    evaluator = LBSemSegEvaluator("cvi_val", distributed=False)
    evaluator.reset()
    evaluator.add_labels(record["file_name"], pred)
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(1.0)


def test_copy_paste_bank_keeps_uncovered_pixels_ignored(camvid, tmp_path):
    json_file, originals = camvid
    _register(json_file, "ignore")
    records = DatasetCatalog.get("cvi_val")
    folder = generate_bank(
        records, str(tmp_path / "bank"), 2, seed=0, class_names=CLASSES, background=None
    )
    bank = json.loads((Path(folder) / "bank.json").read_text())
    assert [c["id"] for c in bank["categories"]] == list(range(len(CLASSES)))
    _, bank_records = read_current_bank(str(tmp_path / "bank"))
    for image, bank_record in zip(bank["images"], bank_records):
        label = record_to_label_map(bank_record)
        source = originals[Path(image["source_file_name"]).name]
        # pasted objects cover some Unlabelled pixels; all the others stay ignored
        assert ((label == IGNORE) <= (source == UNLABELLED)).all()
        assert (label == IGNORE).sum() > 0
        assert not (label == UNLABELLED).any()
        assert 0 in {a["category_id"] for a in bank["annotations"] if a["image_id"] == image["id"]}


def test_bank_of_an_ignore_dataset_has_no_background_class():
    from detectron2.data import MetadataCatalog

    from mask2former.engine import get_project_cfg
    from mask2former.engine.hooks import bank_background_from_cfg

    cfg = get_project_cfg()
    for name, uncovered, expected in (
        ("_bank_bg_ignore", "ignore", None),
        ("_bank_bg_background", "background", 0),
    ):
        MetadataCatalog.get(name).set(uncovered=uncovered)
        cfg.DATASETS.TRAIN = (name,)
        try:
            assert bank_background_from_cfg(cfg) == expected
        finally:
            MetadataCatalog.remove(name)
