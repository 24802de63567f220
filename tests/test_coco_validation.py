"""COCO json validation: every bad-input case gives its report entry, fix or clear error."""

import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import detection_utils as utils
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.data.coco import PROBLEMS, ValidationPolicy, load_coco_semseg_json
from mask2former.data.masks.rasterize import polygons_to_label_map

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not available"
)

W, H = 40, 30


def box(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def write_image(path, size=(W, H), mode="RGB", color=(90, 120, 150), exif=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color).convert(mode)
    kwargs = {"exif": exif} if exif is not None else {}
    img.save(path, **kwargs)


def base_coco():
    """Two clean images, three annotations, categories 1 and 2."""
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "b.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Metal"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [box(2, 2, 20, 20)],
                "area": 324.0,
                "bbox": [2, 2, 18, 18],
                "iscrowd": 0,
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "segmentation": [box(10, 10, 30, 25)],
                "area": 300.0,
                "bbox": [10, 10, 20, 15],
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 2,
                "category_id": 2,
                "segmentation": [box(0, 0, 8, 8)],
                "area": 64.0,
                "bbox": [0, 0, 8, 8],
                "iscrowd": 0,
            },
        ],
    }


@pytest.fixture
def dataset(tmp_path):
    """Returns ``make(coco) -> json path`` writing images a.jpg / b.jpg in tmp_path."""
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")

    def make(coco):
        path = tmp_path / "ann.json"
        path.write_text(json.dumps(coco))
        return str(path)

    return make


def load(json_file, **policy):
    return load_coco_semseg_json(json_file, str(Path(json_file).parent), ValidationPolicy(**policy))


def test_clean_json_has_no_problems(dataset):
    data = load(dataset(base_coco()))
    assert not any(data.report.counts.values())
    assert [r["image_id"] for r in data.records] == [1, 2]
    rec = data.records[0]
    assert Path(rec["file_name"]).is_absolute() and (rec["height"], rec["width"]) == (H, W)
    assert [a["category_id"] for a in rec["annotations"]] == [1, 2]
    assert rec["annotations"][0]["segmentation"] == [box(2, 2, 20, 20)]
    assert data.has_ground_truth and data.categories.class_names == ["Background", "Paper", "Metal"]


def test_duplicate_annotation_ids(dataset):
    coco = base_coco()
    coco["annotations"][2]["id"] = 10
    fixed = load(dataset(coco))
    assert fixed.report.counts["duplicate_annotation_id"] == 1
    assert "b.jpg ann 10" in fixed.report.examples["duplicate_annotation_id"][0]
    assert sum(len(r["annotations"]) for r in fixed.records) == 3
    skipped = load(dataset(coco), duplicate_annotation_id="skip")
    assert sum(len(r["annotations"]) for r in skipped.records) == 2
    with pytest.raises(ValueError, match="(?s)ann.json.*duplicate_annotation_id"):
        load(dataset(coco), duplicate_annotation_id="error")


@pytest.mark.parametrize(
    "polygon, detail",
    [
        ([1.0, 1.0, 5.0, 1.0], "2 points"),
        ([1.0, 1.0, 5.0, 1.0, 5.0], "odd number"),
        ([1, 1, "x", 2, 3, 3], "non-numeric"),
    ],
)
def test_degenerate_polygons(dataset, polygon, detail):
    coco = base_coco()
    coco["annotations"][0]["segmentation"].append(polygon)  # a bad second part: dropped
    coco["annotations"][2]["segmentation"] = [polygon]  # the only part: annotation dropped
    data = load(dataset(coco))
    assert data.report.counts["degenerate_polygon"] == 2
    assert detail in data.report.examples["degenerate_polygon"][0]
    assert data.records[0]["annotations"][0]["segmentation"] == [box(2, 2, 20, 20)]
    assert data.records[1]["annotations"] == []
    assert data.report.counts["image_without_annotations"] == 1
    with pytest.raises(ValueError, match="degenerate_polygon"):
        load(dataset(coco), degenerate_polygon="error")


def test_out_of_bounds_clipped_or_dropped(dataset):
    coco = base_coco()
    coco["annotations"][1]["segmentation"] = [[30.0, 10.0, 55.0, 20.0, 30.0, 40.0]]
    fixed = load(dataset(coco))
    assert fixed.report.counts["out_of_bounds"] == 1
    assert "a.jpg ann 11" in fixed.report.examples["out_of_bounds"][0]
    xy = np.asarray(fixed.records[0]["annotations"][1]["segmentation"][0]).reshape(-1, 2)
    assert xy[:, 0].max() == W and xy[:, 1].max() == H and xy.min() >= 0
    # Clipping keeps the part inside the image: same pixels as the unclipped polygon (the clip
    # only moves the boundary on the image border).
    unclipped = polygons_to_label_map(
        [{"segmentation": coco["annotations"][1]["segmentation"], "category_id": 1}], H, W
    )
    clipped = polygons_to_label_map([dict(fixed.records[0]["annotations"][1], category_id=1)], H, W)
    assert (unclipped != clipped).sum() <= 2
    skipped = load(dataset(coco), out_of_bounds="skip")
    assert [a["id"] for a in skipped.records[0]["annotations"]] == [10]
    with pytest.raises(ValueError, match="out_of_bounds"):
        load(dataset(coco), out_of_bounds="error")


def test_zero_area_polygon(dataset):
    coco = base_coco()
    coco["annotations"][2]["segmentation"] = [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0, 3.0, 3.0]]
    data = load(dataset(coco))
    assert data.report.counts["zero_area"] == 1 and data.records[1]["annotations"] == []
    # A figure-eight has zero signed area but covers pixels: kept.
    coco["annotations"][2]["segmentation"] = [[0.0, 0.0, 10.0, 10.0, 10.0, 0.0, 0.0, 10.0]]
    data = load(dataset(coco))
    assert data.report.counts["zero_area"] == 0 and len(data.records[1]["annotations"]) == 1
    with pytest.raises(ValueError, match="zero_area"):
        coco["annotations"][2]["segmentation"] = [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]
        load(dataset(coco), zero_area="error")


def test_unknown_category_and_orphans(dataset):
    coco = base_coco()
    coco["annotations"][1]["category_id"] = 7
    coco["annotations"].append(dict(coco["annotations"][0], id=99, image_id=42))
    with pytest.raises(ValueError) as err:
        load(dataset(coco))
    message = str(err.value)
    assert "ann.json" in message and "unknown_category" in message and "a.jpg ann 11" in message
    data = load(dataset(coco), unknown_category="skip")
    assert (
        data.report.counts["unknown_category"] == 1 and data.report.counts["orphan_annotation"] == 1
    )
    assert [a["id"] for a in data.records[0]["annotations"]] == [10]
    with pytest.raises(ValueError, match="orphan_annotation"):
        load(dataset(coco), unknown_category="skip", orphan_annotation="error")


def test_missing_and_truncated_images(dataset, tmp_path):
    coco = base_coco()
    coco["images"].append({"id": 3, "file_name": "sub/missing.jpg", "width": W, "height": H})
    with pytest.raises(ValueError, match="(?s)missing_image.*sub/missing.jpg"):
        load(dataset(coco))
    data = load(dataset(coco), missing_image="skip")
    assert [r["image_id"] for r in data.records] == [1, 2]
    assert load(dataset(coco), check_files=False).records[-1]["image_id"] == 3  # no disk check

    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b.jpg", quality=95)
    data_bytes = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    assert load(dataset(base_coco())).report.counts["unreadable_image"] == 0  # headers only
    with pytest.raises(ValueError, match="unreadable_image"):
        load(dataset(base_coco()), verify_images=True)
    data = load(dataset(base_coco()), verify_images=True, missing_image="skip")
    assert data.report.counts["unreadable_image"] == 1 and [
        r["image_id"] for r in data.records
    ] == [1]
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    assert load(dataset(base_coco()), missing_image="skip").report.counts["unreadable_image"] == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_reported_and_read_as_rgb(dataset, tmp_path, mode):
    coco = base_coco()
    coco["images"][1]["file_name"] = f"b_{mode}.png"
    write_image(tmp_path / f"b_{mode}.png", mode=mode)
    data = load(dataset(coco))
    assert (
        data.report.counts["non_rgb_image"] == 1
        and f"mode {mode}" in data.report.examples["non_rgb_image"][0]
    )
    assert utils.read_image(data.records[1]["file_name"], format="RGB").shape == (H, W, 3)


def rle_of(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(rle, counts=rle["counts"].decode("ascii"))


def exif_with_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_exif_rotated_image(dataset, tmp_path, orientation):
    # Raw file 40x30 (W x H) with a transposing orientation: displayed 30x40. A red block in the
    # raw frame, annotated in the raw frame.
    raw = np.full((H, W, 3), 40, dtype=np.uint8)
    raw[5:15, 25:38] = (250, 0, 0)
    Image.fromarray(raw).save(tmp_path / "rot.png", exif=exif_with_orientation(orientation))
    coco = base_coco()
    coco["images"][1].update(file_name="rot.png")  # json size = raw size: annotated on raw pixels
    coco["annotations"][2]["segmentation"] = [box(25, 5, 38, 15)]
    coco["annotations"].append(
        dict(
            coco["annotations"][2],
            id=13,
            category_id=1,
            segmentation=rle_of((raw == (250, 0, 0)).all(-1)),
        )
    )
    data = load(dataset(coco))
    assert data.report.counts["exif_size_mismatch"] == 1
    record = data.records[1]
    image = utils.read_image(record["file_name"], format="RGB")
    assert image.shape[:2] == (record["height"], record["width"]) == (W, H)
    polygon, rle = record["annotations"]
    for ann in (polygon, rle):
        label = polygons_to_label_map([ann], record["height"], record["width"])
        assert (label > 0).sum() == 13 * 10
        assert (image[label > 0] == (250, 0, 0)).all()
    with pytest.raises(ValueError, match="(?s)exif_size_mismatch.*EXIF_ROTATION"):
        load(dataset(coco), exif_rotation="error")
    # json already in the displayed frame: only reported.
    coco["images"][1].update(width=H, height=W)
    coco["annotations"][2]["segmentation"] = [box(1, 1, 5, 5)]
    coco["annotations"].pop()
    data = load(dataset(coco))
    assert data.report.counts["exif_rotated"] == 1 and data.report.counts["exif_size_mismatch"] == 0
    assert (data.records[1]["height"], data.records[1]["width"]) == (W, H)


def test_size_mismatch(dataset, tmp_path):
    write_image(tmp_path / "big.jpg", size=(2 * W, 2 * H))
    coco = base_coco()
    coco["images"][1]["file_name"] = "big.jpg"
    with pytest.raises(ValueError, match="size_mismatch"):
        load(dataset(coco))
    small = np.zeros((H, W), dtype=bool)
    small[2:6, 3:8] = True
    coco["annotations"].append(dict(coco["annotations"][2], id=13, segmentation=rle_of(small)))
    data = load(dataset(coco), size_mismatch="fix")
    record = data.records[1]
    assert (record["height"], record["width"]) == (2 * H, 2 * W)
    assert record["annotations"][0]["segmentation"] == [box(0, 0, 16, 16)]
    scaled = polygons_to_label_map(record["annotations"][1:], 2 * H, 2 * W) > 0
    np.testing.assert_array_equal(scaled, np.kron(small, np.ones((2, 2), dtype=bool)))
    assert [r["image_id"] for r in load(dataset(coco), size_mismatch="skip").records] == [1]


def test_category_ids_zero_background_and_gaps(dataset):
    coco = base_coco()
    coco["categories"] = [
        {"id": 0, "name": "Aluminium foil"},
        {"id": 5, "name": "Metal"},
        {"id": 9, "name": "_background_"},
    ]
    for ann, cat in zip(coco["annotations"], (0, 5, 9)):
        ann["category_id"] = cat
    data = load(dataset(coco))
    assert data.categories.category_id_to_label == {0: 1, 5: 2, 9: 0}
    assert data.categories.class_names == ["Background", "Aluminium foil", "Metal"]
    assert (
        data.report.counts["category_remap"] == 2 and data.report.counts["background_category"] == 1
    )
    assert data.report.counts["background_annotation"] == 1
    assert [a["category_id"] for a in data.records[0]["annotations"]] == [1, 2]
    assert data.records[1]["annotations"] == []  # the background-category annotation is dropped


def test_duplicate_images(dataset):
    coco = base_coco()
    coco["images"].append({"id": 3, "file_name": "a.jpg", "width": W, "height": H})
    coco["annotations"].append(dict(coco["annotations"][2], id=13, image_id=3))
    merged = load(dataset(coco))
    assert merged.report.counts["duplicate_file_name"] == 1 and len(merged.records) == 2
    assert [a["id"] for a in merged.records[0]["annotations"]] == [10, 11, 13]
    skipped = load(dataset(coco), duplicate_file_name="skip")
    assert [a["id"] for a in skipped.records[0]["annotations"]] == [10, 11]
    assert skipped.report.counts["orphan_annotation"] == 0

    coco = base_coco()
    coco["images"].append({"id": 2, "file_name": "c.jpg", "width": W, "height": H})
    with pytest.raises(ValueError, match="duplicate_image_id"):
        load(dataset(coco))
    data = load(dataset(coco), duplicate_image_id="skip", check_files=False)
    assert [r["image_id"] for r in data.records] == [1]


def test_rle_crowd_and_inconsistent_area_bbox(dataset):
    coco = base_coco()
    coco["annotations"][2].update(
        segmentation={"size": [H, W], "counts": [3 * H, 5, H - 5, 5, W * H - 3 * H - H - 5]},
        iscrowd=1,
    )
    coco["annotations"][0].update(area=5000.0, bbox=[0, 0, 5, 5])
    data = load(dataset(coco))
    counts = data.report.counts
    assert counts["rle_segmentation"] == 1 and counts["crowd_annotation"] == 1
    assert counts["area_mismatch"] == 1 and counts["bbox_mismatch"] == 1
    assert data.records[0]["annotations"][0]["area"] == 18 * 18  # polygon area replaces the json's
    label = polygons_to_label_map(data.records[1]["annotations"], H, W)
    assert (label == 2).sum() == 10 and label[0, 3] == 2 and label[4, 4] == 2 and label[5, 4] == 0


def test_policy_values_are_checked():
    with pytest.raises(ValueError, match="DATASETS.VALIDATION.ZERO_AREA"):
        ValidationPolicy(zero_area="fix")
    assert (
        ValidationPolicy.from_cfg({"ZERO_AREA": "error", "CHECK_FILES": False}).zero_area == "error"
    )
    assert all(p.policy is None or hasattr(ValidationPolicy(), p.policy) for p in PROBLEMS.values())


def test_malformed_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load(str(tmp_path / "bad.json"))
    (tmp_path / "noimg.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="noimg.json: not a COCO json"):
        load(str(tmp_path / "noimg.json"))


def test_input_json_is_not_modified(dataset):
    coco = base_coco()
    coco["annotations"][1]["segmentation"] = [[30.0, 10.0, 55.0, 20.0, 30.0, 40.0]]
    path = dataset(coco)
    before = Path(path).read_bytes()
    load(path)
    assert Path(path).read_bytes() == before


@requires_shared_data
def test_taco_json_loads_with_its_anomalies_reported():
    json_file = str(SHARED_DATA / "taco" / "annotations.json")
    data = load_coco_semseg_json(
        json_file, str(SHARED_DATA / "taco"), ValidationPolicy(check_files=False)
    )
    counts = data.report.counts
    assert counts["duplicate_annotation_id"] == 2  # ids 309 and 4040, in different images
    assert counts["out_of_bounds"] == 7  # -1.0 coordinates
    assert counts["category_remap"] == 60  # ids 0..59 -> labels 1..60
    assert sum(counts.values()) == 69
    assert data.categories.category_id_to_label[0] == 1  # "Aluminium foil" is not background
    assert len(data.records) == 1500 and sum(len(r["annotations"]) for r in data.records) == 4784
    for rec in data.records:
        for ann in rec["annotations"]:
            xy = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            assert (
                xy.min() >= 0 and xy[:, 0].max() <= rec["width"] and xy[:, 1].max() <= rec["height"]
            )
    missing = load_coco_semseg_json(
        json_file, str(SHARED_DATA / "taco"), ValidationPolicy(missing_image="skip")
    )
    assert missing.report.counts["missing_image"] == 1500 and missing.records == []


@requires_shared_data
def test_labelme_json_loads_with_its_anomalies_reported():
    root = SHARED_DATA / "labelme_coco"
    data = load_coco_semseg_json(
        str(root / "annotations.json"), str(root), ValidationPolicy(verify_images=True)
    )
    counts = data.report.counts
    assert counts["background_category"] == 1  # "_background_" with id 0
    assert counts["out_of_bounds"] == 1  # ann 9: y = 375.38 on a 375-pixel image
    assert sum(counts.values()) == 2  # labelme's pixel-count areas are within the area tolerance
    assert (
        data.categories.category_id_to_label[0] == 0
        and data.categories.category_id_to_label[15] == 15
    )
    assert [r["image_id"] for r in data.records] == [0, 1, 2]  # image id 0 is a valid id
    assert sum(len(r["annotations"]) for r in data.records) == 12
    for record in data.records:
        image = utils.read_image(record["file_name"], format="RGB")
        assert image.shape == (record["height"], record["width"], 3)
        label = polygons_to_label_map(record["annotations"], record["height"], record["width"])
        assert set(np.unique(label)) - {0} == {a["category_id"] for a in record["annotations"]}
