"""COCO polygons -> label map: pixel agreement with pycocotools, draw order, records."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.data.masks import rasterize
from mask2former.data.masks.rasterize import (
    RASTERIZE_IMPLS,
    draw_order_indices,
    polygon_area,
    polygon_mask,
    polygons_to_label_map,
    record_to_label_map,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def ann_to_mask(segmentation, height, width):
    """What ``COCO.annToMask`` does for a polygon annotation."""
    rles = mask_util.frPyObjects(segmentation, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def full_mask(polygons, height, width, impl=None):
    mask, box = polygon_mask(polygons, height, width, impl)
    out = np.zeros((height, width), dtype=bool)
    if mask is not None:
        r0, r1, c0, c1 = box
        out[r0:r1, c0:c1] = mask
    return out


def random_polygon(rng, height, width, kind):
    k = int(rng.integers(3, 14))
    if kind == "star":  # concave, simple
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radius = rng.uniform(0.2, 0.5, k) * min(height, width)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        xy = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1).reshape(-1)
    elif kind == "tangled":  # random vertex order: self-intersecting
        xy = rng.uniform(-0.2, 1.2, 2 * k) * np.tile([width, height], k)
    elif kind == "decimals":  # 0.1-step coordinates, the worst case for 5x rounding
        xy = np.round(rng.uniform(-3, 1.1, 2 * k) * np.tile([width, height], k), 1)
    else:  # half / quarter pixel grid
        xy = rng.integers(-4, 4 * max(height, width), 2 * k) / 4.0
    return xy.tolist()


@pytest.mark.parametrize("impl", RASTERIZE_IMPLS)
@pytest.mark.parametrize("kind", ["star", "tangled", "decimals", "grid"])
def test_polygon_mask_matches_pycocotools(kind, impl):
    rng = np.random.default_rng(["star", "tangled", "decimals", "grid"].index(kind))
    for _ in range(150):
        height, width = (int(v) for v in rng.integers(1, 48, 2))
        polygons = [
            random_polygon(rng, height, width, kind) for _ in range(int(rng.integers(1, 4)))
        ]
        np.testing.assert_array_equal(
            full_mask(polygons, height, width, impl), ann_to_mask(polygons, height, width)
        )


def test_compiled_scan_equals_numpy_scan():
    """The compiled toggles are NumPy's, in the same order, for every kind of polygon (long
    edges, degenerate ones, vertices outside the image, 0 to 2 vertices)."""
    rng = np.random.default_rng(5)
    for trial in range(600):
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        k = int(rng.integers(0, 40))
        xy = rng.uniform(-0.3, 1.3, 2 * k) * np.tile([width, height], k)
        if trial % 3 == 0:
            xy = np.round(xy, 1)
        if trial % 7 == 0 and k > 1:
            xy[2:4] = xy[0:2]  # a zero-length edge
        expected = rasterize._column_toggles(xy.tolist(), height, width, "numpy")
        got = rasterize._column_toggles(xy.tolist(), height, width, "cpu")
        for e, g in zip(expected, got):
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, e, err_msg=f"trial {trial}")
        if len(expected[0]):
            box = (int(expected[1].min()), height, int(expected[0].min()), width)
            np.testing.assert_array_equal(
                rasterize._fill_toggles(*got, box, "cpu"),
                rasterize._fill_toggles(*expected, box, "numpy"),
            )
    with pytest.raises(ValueError, match="impl"):
        polygon_mask([[0, 0, 4, 0, 4, 4]], 8, 8, impl="fortran")
    for impl in RASTERIZE_IMPLS:
        with pytest.raises(ValueError, match="non-finite"):
            polygon_mask([[0, 0, 4, float("nan"), 4, 4]], 8, 8, impl=impl)
    record = {
        "file_name": "photos/a.jpg",
        "height": 8,
        "width": 8,
        "annotations": [{"segmentation": [[0, 0, 4, float("inf"), 4, 4]], "category_id": 1}],
    }
    with pytest.raises(ValueError, match="photos/a.jpg: annotations: polygon with non-finite"):
        record_to_label_map(record, "file")


def test_polygon_entirely_outside_and_on_pixel_edges():
    outside = [[-10.0, -10.0, -2.0, -10.0, -2.0, -3.0]]
    assert polygon_mask(outside, 8, 8) == (None, None)
    square = [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]]  # exactly on pixel boundaries
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    np.testing.assert_array_equal(full_mask(square, 5, 6), expected)
    np.testing.assert_array_equal(full_mask(square, 5, 6), ann_to_mask(square, 5, 6))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_real_taco_polygons_at_reduced_scale():
    with open(SHARED_DATA / "taco" / "annotations.json") as f:
        data = json.load(f)
    images = {img["id"]: img for img in data["images"]}
    scale = 1 / 8
    checked = 0
    for ann in data["annotations"][::6]:
        img = images[ann["image_id"]]
        height, width = int(img["height"] * scale), int(img["width"] * scale)
        polygons = [[v * scale for v in p] for p in ann["segmentation"]]
        expected = ann_to_mask(polygons, height, width)
        for impl in RASTERIZE_IMPLS:
            np.testing.assert_array_equal(full_mask(polygons, height, width, impl), expected)
        checked += 1
    assert checked > 700


def square(x0, y0, size, category):
    x1, y1 = x0 + size, y0 + size
    return {"segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "category_id": category}


def test_area_orders():
    small, large = square(2, 2, 4, 1), square(0, 0, 10, 2)
    anns = [small, large]  # the small one comes first in the json
    assert polygons_to_label_map(anns, 12, 12, "area_desc")[3, 3] == 1  # smaller on top
    assert polygons_to_label_map(anns, 12, 12, "area_asc")[3, 3] == 2
    assert polygons_to_label_map(anns, 12, 12, "file")[3, 3] == 2  # later on top
    label = polygons_to_label_map(anns, 12, 12)
    assert label[8, 8] == 2 and label[11, 11] == 0
    with pytest.raises(ValueError, match="draw_order"):
        polygons_to_label_map(anns, 12, 12, "largest")


def test_area_ties_keep_json_order():
    first, second = square(0, 0, 6, 3), square(2, 2, 6, 4)  # same area, overlapping
    for order in ("area_desc", "area_asc", "file"):
        assert draw_order_indices([first, second], 10, 10, order) == [0, 1]
        assert polygons_to_label_map([first, second], 10, 10, order)[4, 4] == 4


def test_area_is_polygon_area_of_all_parts():
    assert polygon_area([0, 0, 4, 0, 4, 2, 0, 2]) == 8.0
    two_parts = {
        "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3], [5, 5, 8, 5, 8, 8, 5, 8]],
        "category_id": 1,
    }
    one_big = square(0, 0, 4, 2)  # area 16 < 9 + 9: drawn after (on top of) the two-part one
    label = polygons_to_label_map([one_big, two_parts], 10, 10, "area_desc")
    assert label[1, 1] == 2 and label[6, 6] == 1


def test_rle_segmentation_and_label_range():
    mask = np.zeros((6, 7), dtype=np.uint8, order="F")
    mask[1:4, 2:5] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    label = polygons_to_label_map([{"segmentation": rle, "category_id": 9}], 6, 7)
    np.testing.assert_array_equal(label == 9, mask.astype(bool))
    with pytest.raises(ValueError, match="does not fit"):
        polygons_to_label_map([square(0, 0, 2, 300)], 4, 4)
    assert polygons_to_label_map([square(0, 0, 2, 300)], 4, 4, dtype=np.uint16)[0, 0] == 300


def test_record_to_label_map(tmp_path):
    record = {"height": 12, "width": 12, "annotations": [square(2, 2, 4, 1), square(0, 0, 10, 2)]}
    assert record_to_label_map(record)[3, 3] == 1  # default: area_desc
    assert record_to_label_map(record, draw_order="file")[3, 3] == 2
    assert record_to_label_map({"height": 3, "width": 4, "annotations": []}).shape == (3, 4)
    png = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(png).save(tmp_path / "label.png")
    np.testing.assert_array_equal(
        record_to_label_map({"sem_seg_file_name": str(tmp_path / "label.png")}), png
    )
    Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*single-channel"):
        record_to_label_map({"sem_seg_file_name": str(tmp_path / "rgb.png")})


def painted_with_pycocotools(annotations, height, width, order):
    """The label map of ``annotations`` painted one ``COCO.annToMask`` mask at a time."""
    label = np.zeros((height, width), dtype=np.uint8)
    for index in draw_order_indices(annotations, height, width, order):
        ann = annotations[index]
        segmentation = ann["segmentation"]
        if isinstance(segmentation, dict):
            mask = mask_util.decode(segmentation).astype(bool)
        else:
            polygons = [list(np.asarray(p, np.float64).ravel()) for p in segmentation]
            polygons = [p[: len(p) // 2 * 2] for p in polygons if len(p) >= 6]
            mask = ann_to_mask(polygons, height, width) if polygons else False
        label[mask] = ann["category_id"]
    return label


def test_one_call_label_map_equals_per_annotation_painting():
    """Runs of polygon annotations are painted by one compiled call: the same label maps as
    pycocotools mask by mask and as the NumPy path annotation by annotation, with overlapping
    annotations of several polygons, odd-length, empty, tiny and outside polygons, NumPy array
    polygons and RLE annotations between the runs, in every draw order."""
    rng = np.random.default_rng(11)
    kinds = ["star", "tangled", "decimals", "grid"]
    for trial in range(120):
        height, width = (int(v) for v in rng.integers(1, 64, 2))
        annotations = []
        for _ in range(int(rng.integers(0, 9))):
            polygons = [
                random_polygon(rng, height, width, kinds[int(rng.integers(4))])
                for _ in range(int(rng.integers(1, 4)))
            ]
            if rng.random() < 0.15:
                polygons[0] = polygons[0] + [float(rng.uniform(0, width))]  # odd length
            if rng.random() < 0.1:
                polygons = [np.asarray(polygons[0])] + polygons[1:]
            annotations.append({"segmentation": polygons, "category_id": int(rng.integers(1, 255))})
        if trial % 4 == 0 and annotations:
            mask = np.asfortranarray(rng.random((height, width)) < 0.3).astype(np.uint8)
            rle = mask_util.encode(mask)
            annotations.insert(len(annotations) // 2, {"segmentation": rle, "category_id": 7})
        if trial % 5 == 0:
            annotations.append({"segmentation": [], "category_id": 3})
            annotations.append(
                {"segmentation": [[-9.0, -9.0, -2.0, -9.0, -2.0, -3.0]], "category_id": 4}
            )
        for order in ("area_desc", "area_asc", "file"):
            expected = painted_with_pycocotools(annotations, height, width, order)
            got = polygons_to_label_map(annotations, height, width, order, impl="cpu")
            np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial} {order}")
            np.testing.assert_array_equal(
                polygons_to_label_map(annotations, height, width, order, impl="numpy"), expected
            )
    with pytest.raises(ValueError, match="non-finite"):
        polygons_to_label_map([square(0, 0, 2, 1), square(0, 0, float("nan"), 2)], 4, 4, impl="cpu")
    with pytest.raises(ValueError, match="flat lists"):
        polygons_to_label_map(
            [{"segmentation": [[[0, 0], [3, 0], [3, 3]]], "category_id": 1}], 4, 4, impl="cpu"
        )


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_real_taco_label_maps_at_reduced_scale():
    """Whole images of real annotations (many overlapping polygons each): the one-call label
    map equals pycocotools' mask by mask."""
    with open(SHARED_DATA / "taco" / "annotations.json") as f:
        data = json.load(f)
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    scale = 1 / 8
    checked = 0
    for img in data["images"][::5]:
        height, width = int(img["height"] * scale), int(img["width"] * scale)
        anns = [
            {
                "segmentation": [[v * scale for v in p] for p in a["segmentation"]],
                "category_id": 1 + a["category_id"] % 250,
            }
            for a in by_image.get(img["id"], [])
        ]
        np.testing.assert_array_equal(
            polygons_to_label_map(anns, height, width, impl="cpu"),
            painted_with_pycocotools(anns, height, width, "area_desc"),
        )
        checked += len(anns)
    assert checked > 500
