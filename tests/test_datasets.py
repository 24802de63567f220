"""Dataset registration: trash splits from a synthetic root, generic COCO, label maps, config."""

from pathlib import Path

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.deeplab import add_deeplab_config
from PIL import Image

from mask2former.config import add_maskformer2_config
from mask2former.data import (
    TRASH_CLASSES,
    TRASH_COLORS,
    default_palette,
    register_coco_semseg,
    register_datasets_from_cfg,
    register_labelmap_semseg,
    register_trash_dataset,
)
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.synthetic import generate_synthetic_trash

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SPEC_PALETTE = [
    ("Background", (0, 0, 0)),
    ("General trash", (192, 0, 128)),
    ("Paper", (0, 128, 192)),
    ("Paper pack", (0, 128, 64)),
    ("Metal", (128, 0, 0)),
    ("Glass", (64, 0, 128)),
    ("Plastic", (64, 0, 192)),
    ("Styrofoam", (192, 128, 64)),
    ("Plastic bag", (192, 192, 128)),
    ("Battery", (64, 64, 128)),
    ("Clothing", (128, 0, 192)),
]


@pytest.fixture(scope="module")
def trash_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "trash"
    generate_synthetic_trash(str(root), num_train=4, num_val=2, num_test=2, image_size=64, seed=3)
    return root


@pytest.fixture
def unregister():
    """Names registered by a test are removed afterwards (the catalogs are global)."""
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_register_trash_splits(trash_root, unregister):
    names = register_trash_dataset(str(trash_root), prefix="t1")
    unregister.extend(names)
    assert names == ["t1_train_all", "t1_train", "t1_val", "t1_test"]
    meta = MetadataCatalog.get("t1_train")
    assert list(zip(meta.stuff_classes, meta.stuff_colors)) == SPEC_PALETTE
    assert list(TRASH_CLASSES) == [n for n, _ in SPEC_PALETTE] and list(TRASH_COLORS) == [
        c for _, c in SPEC_PALETTE
    ]
    assert (
        meta.evaluator_type == "lb_sem_seg"
        and meta.ignore_label == 255
        and meta.draw_order == "area_desc"
    )
    assert meta.category_id_to_label == {i: i for i in range(1, 11)}
    assert meta.json_file == str(trash_root / "train.json") and meta.image_root == str(trash_root)
    assert meta.has_ground_truth and not MetadataCatalog.get("t1_test").has_ground_truth

    records = DatasetCatalog.get("t1_train_all")
    assert len(records) == 6 and len(DatasetCatalog.get("t1_val")) == 2
    for rec in records:
        assert Path(rec["file_name"]).is_file() and rec["file_name"].startswith(str(trash_root))
        assert (rec["height"], rec["width"]) == (64, 64) and rec["annotations"]
        assert all(1 <= a["category_id"] <= 10 for a in rec["annotations"])
    test_records = DatasetCatalog.get("t1_test")
    assert len(test_records) == 2 and all(r["annotations"] == [] for r in test_records)


def test_registration_is_idempotent_and_cached(trash_root, unregister):
    unregister.extend(register_trash_dataset(str(trash_root), prefix="t2"))
    assert register_trash_dataset(str(trash_root), prefix="t2") == unregister  # no error
    first = DatasetCatalog.get("t2_train")
    first[0]["annotations"].clear()  # callers may modify what they get
    second = DatasetCatalog.get("t2_train")
    assert second[0]["annotations"] and second is not first
    # Different settings replace the registration.
    register_trash_dataset(str(trash_root), prefix="t2", draw_order="file")
    assert MetadataCatalog.get("t2_train").draw_order == "file"


def test_missing_trash_root_registers_nothing(tmp_path):
    assert register_trash_dataset(str(tmp_path), prefix="t3") == []


def test_register_datasets_from_cfg(trash_root, tmp_path, unregister):
    image_dir, label_dir = make_labelmap_dataset(tmp_path, n=2)
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.DATASETS.TRASH_ROOT = str(trash_root)
    cfg.DATASETS.COCO_SEMSEG = [["t4_coco", str(trash_root / "val.json"), str(trash_root)]]
    cfg.DATASETS.LABELMAP_SEMSEG = [["t4_maps", str(image_dir), str(label_dir), 3]]
    cfg.DATASETS.POLYGON_DRAW_ORDER = "area_asc"
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    names = register_datasets_from_cfg(cfg)
    unregister.extend(names)
    assert names == [
        "trash_train_all",
        "trash_train",
        "trash_val",
        "trash_test",
        "t4_coco",
        "t4_maps",
    ]
    assert register_datasets_from_cfg(cfg) == names  # idempotent
    coco_meta = MetadataCatalog.get("t4_coco")
    assert coco_meta.draw_order == "area_asc" and coco_meta.ignore_label == 254
    assert coco_meta.stuff_classes == list(TRASH_CLASSES)  # from the json's categories
    assert MetadataCatalog.get("t4_maps").stuff_classes == ["0", "1", "2"]
    assert len(DatasetCatalog.get("t4_coco")) == 2
    cfg.DATASETS.TRASH_ROOT = ""
    cfg.DATASETS.COCO_SEMSEG = []
    cfg.DATASETS.LABELMAP_SEMSEG = [
        ["t4_named", str(image_dir), str(label_dir), ["sky", "road", "car"]]
    ]
    unregister.extend(register_datasets_from_cfg(cfg))
    assert MetadataCatalog.get("t4_named").stuff_classes == ["sky", "road", "car"]
    cfg.DATASETS.COCO_SEMSEG = [["only_a_name"]]
    with pytest.raises(ValueError, match="name, json_file, image_root"):
        register_datasets_from_cfg(cfg)


def make_labelmap_dataset(tmp_path, n=3, size=(12, 10)):
    image_dir, label_dir = tmp_path / "images", tmp_path / "labels"
    image_dir.mkdir()
    label_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            image_dir / f"im{i}.jpg"
        )
        label = rng.integers(0, 3, (size[1], size[0]), dtype=np.uint8)
        label[0, 0] = 255
        Image.fromarray(label).save(label_dir / f"im{i}.png")
    return image_dir, label_dir


def test_labelmap_dataset(tmp_path, unregister):
    image_dir, label_dir = make_labelmap_dataset(tmp_path)
    register_labelmap_semseg("t5_maps", str(image_dir), str(label_dir), ["a", "b", "c"])
    unregister.append("t5_maps")
    register_labelmap_semseg(
        "t5_maps", str(image_dir), str(label_dir), ["a", "b", "c"]
    )  # idempotent
    meta = MetadataCatalog.get("t5_maps")
    assert (
        meta.stuff_colors == default_palette(3)
        and meta.ignore_label == 255
        and meta.has_ground_truth
    )
    records = DatasetCatalog.get("t5_maps")
    assert [r["image_id"] for r in records] == ["im0", "im1", "im2"]
    rec = records[1]
    assert (rec["height"], rec["width"]) == (10, 12) and rec["sem_seg_file_name"].endswith(
        "im1.png"
    )
    label = record_to_label_map(rec)
    assert label.shape == (10, 12) and label[0, 0] == 255


def test_labelmap_dataset_unpaired_files(tmp_path, unregister):
    image_dir, label_dir = make_labelmap_dataset(tmp_path)
    (label_dir / "im1.png").rename(label_dir / "other.png")
    register_labelmap_semseg("t6_maps", str(image_dir), str(label_dir), ["a", "b", "c"])
    unregister.append("t6_maps")
    with pytest.raises(
        ValueError, match="(?s)images without a label.*im1.*labels without an image.*other"
    ):
        DatasetCatalog.get("t6_maps")
    with pytest.raises(FileNotFoundError, match="no folder"):
        register_labelmap_semseg("t6_none", str(tmp_path / "nope"), str(label_dir), ["a"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_register_generic_coco_with_background_category(unregister):
    root = SHARED_DATA / "labelme_coco"
    register_coco_semseg("t7_labelme", str(root / "annotations.json"), str(root))
    unregister.append("t7_labelme")
    meta = MetadataCatalog.get("t7_labelme")
    assert meta.stuff_classes[0] == "Background" and meta.stuff_classes[15] == "person"
    assert len(meta.stuff_classes) == 21 and meta.category_id_to_label[0] == 0
    assert meta.stuff_colors[0] == (0, 0, 0) and len(set(meta.stuff_colors)) == 21
    records = DatasetCatalog.get("t7_labelme")
    assert len(records) == 3 and sum(len(r["annotations"]) for r in records) == 12
