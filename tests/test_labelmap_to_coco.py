"""Label maps -> COCO polygons -> label maps round trip (holes, islands, small parts, CamVid)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from camvid import CAMVID_CLASSES
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.data.coco import ValidationPolicy, load_coco_semseg_json
from mask2former.data.masks.rasterize import polygons_to_label_map
from mask2former.data.masks.trace import ConversionStats, label_map_to_annotations
from mask2former.data.offline.convert_labelmaps import labelmaps_to_coco

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def round_trip(label, ignore_label=255, background=0, **kwargs):
    anns = label_map_to_annotations(label, ignore_label, background, **kwargs)
    return anns, polygons_to_label_map(anns, *label.shape)


def expected(label, ignore_label=255):
    out = label.copy()
    out[out == ignore_label] = 0
    return out


def test_random_label_maps_round_trip_exactly():
    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = (int(v) for v in rng.integers(4, 40, 2))
        if i % 2:  # blocky regions with speckles: holes, islands, diagonal contacts
            coarse = rng.integers(0, 4, (5, 5)).astype(np.uint8)
            label = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
            speckle = rng.random((h, w)) < 0.08
            label[speckle] = rng.integers(0, 4, int(speckle.sum()))
        else:  # pixel noise
            label = rng.integers(0, 4, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.03] = 255
        anns, back = round_trip(label)
        np.testing.assert_array_equal(back, expected(label))
        assert all(a["category_id"] in (1, 2, 3) for a in anns)
        # pycocotools agrees: each annotation covers exactly its component's pixels.
        for ann in anns[:5]:
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], h, w))
            assert mask_util.area(rle) == ann["area"]


def test_holes_and_islands():
    label = np.zeros((20, 20), dtype=np.uint8)
    label[2:18, 2:18] = 1
    label[5:15, 5:15] = 0  # background hole
    label[8:12, 8:12] = 2  # island of another class inside the hole
    label[3, 3] = 0  # one-pixel hole
    anns, back = round_trip(label)
    np.testing.assert_array_equal(back, label)
    assert sorted(a["category_id"] for a in anns) == [1, 2]
    ring = next(a for a in anns if a["category_id"] == 1)
    assert len(ring["segmentation"]) == 1 and ring["area"] == 16 * 16 - 100 - 1
    # Whatever the draw order, the result is the same: annotations never overlap.
    for order in ("area_asc", "file"):
        np.testing.assert_array_equal(polygons_to_label_map(anns, 20, 20, order), label)


def test_small_components_dropped_or_kept():
    label = np.zeros((10, 10), dtype=np.uint8)
    label[1:6, 1:6] = 1
    label[8, 8] = 2
    label[8, 1:3] = 1
    stats = ConversionStats()
    anns, back = round_trip(label, min_area=3, stats=stats)
    assert [a["area"] for a in anns] == [25.0]
    assert (stats.components, stats.dropped_components, stats.dropped_pixels) == (1, 2, 3)
    assert back[8, 8] == 0 and back[8, 1] == 0
    anns, back = round_trip(label, min_area=3, small="keep")
    np.testing.assert_array_equal(back, label)
    with pytest.raises(ValueError, match="small"):
        label_map_to_annotations(label, small="merge")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_camvid_labels_round_trip(tmp_path):
    label_dir = SHARED_DATA / "camvid" / "val" / "labels"
    names = sorted(p.name for p in label_dir.glob("*.png"))[:3]
    for name in names:
        label = np.asarray(Image.open(label_dir / name))
        # CamVid: 0 is "sky" (a class), 11 is "unlabelled" (ignored).
        anns = label_map_to_annotations(label, ignore_label=11, background=None)
        shifted = [dict(a, category_id=a["category_id"] + 1) for a in anns]
        back = polygons_to_label_map(shifted, *label.shape).astype(int) - 1
        back[back < 0] = 11
        np.testing.assert_array_equal(back, label)

    # The folder converter writes a json that loads with no problem but the id remapping.
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in names:
        (labels / name).write_bytes((label_dir / name).read_bytes())
    classes = CAMVID_CLASSES
    images = SHARED_DATA / "camvid" / "val" / "images"
    out = tmp_path / "camvid.json"
    stats = labelmaps_to_coco(
        str(labels), str(out), classes, image_dir=str(images), ignore_label=11, background=None
    )
    coco = json.loads(out.read_text())
    assert [img["file_name"] for img in coco["images"]] == [
        n.replace(".png", ".jpg") for n in names
    ]
    assert len(coco["annotations"]) == stats.components > 0
    data = load_coco_semseg_json(str(out), str(images), ValidationPolicy())
    assert {k for k, n in data.report.counts.items() if n} == {"category_remap"}, (
        data.report.table()
    )
    assert data.categories.class_names[1:] == classes  # json ids 0..10 -> labels 1..11


def test_folder_conversion_errors(tmp_path):
    Image.fromarray(np.full((4, 4), 7, dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="a.png: label values \\[7\\]"):
        labelmaps_to_coco(str(tmp_path), str(tmp_path / "out.json"), ["bg", "x"])
    with pytest.raises(FileNotFoundError, match="no image"):
        labelmaps_to_coco(
            str(tmp_path),
            str(tmp_path / "out.json"),
            [str(i) for i in range(8)],
            image_dir=str(tmp_path),
        )
    assert not (tmp_path / "out.json").exists()


def test_folder_conversion_records_what_uncovered_pixels_are(tmp_path):
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:2] = 1
    label[3, 3] = 2  # the ignore label
    Image.fromarray(label).save(tmp_path / "a.png")
    out = tmp_path / "out.json"
    labelmaps_to_coco(str(tmp_path), str(out), ["x", "y"], ignore_label=2, background=None)
    coco = json.loads(out.read_text())
    assert coco["info"]["uncovered"] == "ignore"
    assert [c["id"] for c in coco["categories"]] == [0, 1]
    labelmaps_to_coco(str(tmp_path), str(out), ["bg", "y"], ignore_label=2)
    assert json.loads(out.read_text())["info"]["uncovered"] == "background"
    with pytest.raises(ValueError, match="ignore label 1 is one of the 2 class values"):
        labelmaps_to_coco(str(tmp_path), str(out), ["x", "y"], ignore_label=1, background=None)
