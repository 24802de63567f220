"""Load and validate a COCO-polygon json for semantic segmentation.

Real annotation files are dirty. :func:`load_coco_semseg_json` checks a COCO json (and, if asked,
the image files) and returns cleaned Detectron2 records, the category -> label mapping and a
:class:`ValidationReport` (count + examples per problem, logged as a table).

Each problem has a policy (``DATASETS.VALIDATION.*``, see :class:`ValidationPolicy`):
``"fix"`` repairs it, ``"skip"`` drops the polygon / annotation / image with a warning,
``"error"`` stops with a ``ValueError`` naming the json file, the problem and examples (all
problems are collected first, so one run shows all of them). Some problems are always handled the
same way and only reported (grayscale / RGBA images are converted to RGB at read time, json areas
are replaced by polygon areas, ...); :data:`PROBLEMS` lists every kind with its action.

Coordinates follow COCO: pixel ``(row i, col j)`` covers ``[j, j+1] x [i, i+1]``, so a polygon
is inside an image of size ``W x H`` when ``0 <= x <= W`` and ``0 <= y <= H``.

Categories map to contiguous labels ``1..K`` in increasing json id order (label 0 is background,
every pixel no annotation covers). A category named like background (``"_background_"``,
``"background"``) maps to label 0 and its annotations are dropped. A real category with id 0
(TACO's "Aluminium foil") gets a label >= 1 like any other: it never collides with background.
With ``uncovered="ignore"`` (datasets without a background class) the categories map to
``0..K-1`` in id order instead, whatever their names, and uncovered pixels are ignored.
"""

import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import List

from detectron2.structures import BoxMode
from pycocotools import mask as mask_util
from tqdm import tqdm

from .categories import CategoryMapping, build_category_mapping
from .images import ImageGeometry, inspect_image_file
from .json_file import read_coco_json
from .polygons import PolygonStats, clip_polygon, polygon_array, union_bbox
from .report import ValidationPolicy, ValidationReport

__all__ = ["CocoSemSegData", "load_coco_semseg_json"]

# Number of images from which the file check shows a progress bar.
_PROGRESS_MIN_IMAGES = 256


@dataclass
class CocoSemSegData:
    """Result of :func:`load_coco_semseg_json`."""

    records: List[dict]
    categories: CategoryMapping
    has_ground_truth: bool
    report: ValidationReport = field(repr=False)


class _CocoValidator:
    """One validation run over a parsed json (see :func:`load_coco_semseg_json`)."""

    def __init__(self, data, json_file, image_root, policy, mapping, report):
        self.data = data
        self.json_file = json_file
        self.image_root = image_root
        self.policy = policy
        self.mapping = mapping
        self.report = report

    # -- images ------------------------------------------------------------------------------
    def _image_entries(self):
        """Valid, de-duplicated image entries by id, and a redirect for merged duplicates."""
        images, redirect = OrderedDict(), {}
        by_id = defaultdict(list)
        for img in self.data["images"]:
            if (
                not isinstance(img, dict)
                or not isinstance(img.get("file_name"), str)
                or "id" not in img
            ):
                raise ValueError(
                    f"{self.json_file}: invalid image entry {img!r} (needs id and file_name)"
                )
            for key in ("height", "width"):
                if not isinstance(img.get(key), int) or img[key] <= 0:
                    raise ValueError(
                        f"{self.json_file}: image {img['file_name']!r} has invalid {key} "
                        f"{img.get(key)!r}"
                    )
            by_id[img["id"]].append(img)
        dropped_ids = set()
        for image_id, entries in by_id.items():
            if len(entries) > 1:
                names = sorted({e["file_name"] for e in entries})
                self.report.add(
                    "duplicate_image_id", f"image id {image_id}", f"{len(entries)} entries: {names}"
                )
                dropped_ids.add(image_id)
            else:
                images[image_id] = entries[0]
        first_by_name = {}
        for image_id, img in list(images.items()):
            first = first_by_name.setdefault(img["file_name"], image_id)
            if first == image_id:
                continue
            self.report.add(
                "duplicate_file_name", img["file_name"], f"image ids {first} and {image_id}"
            )
            del images[image_id]
            if self.policy.duplicate_file_name == "fix":
                redirect[image_id] = first
            else:
                dropped_ids.add(image_id)
        return images, redirect, dropped_ids

    def _check_file(self, img):
        """Geometry of the annotations for ``img`` or None if the image is dropped."""
        geometry = ImageGeometry(img["width"], img["height"])
        if not self.policy.check_files:
            return geometry
        name = img["file_name"]
        path = os.path.join(self.image_root, name)
        if not os.path.isfile(path):
            self.report.add("missing_image", name, f"no file {path}")
            return None
        info = inspect_image_file(path, verify=self.policy.verify_images)
        if info.error:
            self.report.add("unreadable_image", name, info.error)
            return None
        if info.mode != "RGB":
            self.report.add("non_rgb_image", name, f"mode {info.mode}")
        json_size = (img["width"], img["height"])
        if json_size == info.size:
            if info.orientation != 1:
                ambiguous = info.size == info.raw_size
                detail = f"orientation {info.orientation}" + (
                    " (raw size identical: assumed annotated on the displayed image)"
                    if ambiguous
                    else ""
                )
                self.report.add("exif_rotated", name, detail)
            return geometry
        if json_size == info.raw_size:
            self.report.add(
                "exif_size_mismatch",
                name,
                f"orientation {info.orientation}, json {json_size}, displayed {info.size}",
            )
            if self.policy.exif_rotation != "fix":
                return None
            return ImageGeometry(*info.size, orientation=info.orientation, raw_size=info.raw_size)
        self.report.add("size_mismatch", name, f"json {json_size}, file {info.size}")
        if self.policy.size_mismatch != "fix":
            return None
        scale = (info.size[0] / json_size[0], info.size[1] / json_size[1])
        return ImageGeometry(*info.size, scale=scale)

    # -- annotations -------------------------------------------------------------------------
    def _annotations_by_image(self, images, redirect, dropped_ids):
        anns_by_image = defaultdict(list)
        seen_ids = set()
        for ann in self.data.get("annotations", []):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise ValueError(f"{self.json_file}: invalid annotation entry {str(ann)[:200]}")
            ann_id = ann.get("id")
            image_id = redirect.get(ann["image_id"], ann["image_id"])
            if image_id not in images:
                if ann["image_id"] not in dropped_ids:
                    self.report.add(
                        "orphan_annotation", f"ann {ann_id}", f"image id {ann['image_id']}"
                    )
                continue
            where = f"{images[image_id]['file_name']} ann {ann_id}"
            if ann_id is not None and ann_id in seen_ids:
                self.report.add("duplicate_annotation_id", where)
                if self.policy.duplicate_annotation_id != "fix":
                    continue
            seen_ids.add(ann_id)
            category = ann.get("category_id")
            if category in self.mapping.background_ids:
                self.report.add("background_annotation", where, f"category {category}")
                continue
            if category not in self.mapping.category_id_to_label:
                self.report.add("unknown_category", where, f"category_id {category!r}")
                continue
            anns_by_image[image_id].append(ann)
        return anns_by_image

    def _clean_polygons(self, segmentation, geometry, where):
        """Validate, transform and clip the polygons of one annotation.

        Returns ``(cleaned, originals)``: :class:`PolygonStats` of the cleaned polygons (None
        if the annotation is dropped) and of the valid polygons as found in the json (for the
        area / bbox consistency check).
        """
        if not isinstance(segmentation, list) or not segmentation:
            self.report.add("degenerate_polygon", where, "empty or missing segmentation")
            return None, []
        width, height = geometry.width, geometry.height
        cleaned, originals, out_of_bounds = [], [], False
        for poly in segmentation:
            xy = polygon_array(poly)
            if isinstance(xy, str):
                self.report.add("degenerate_polygon", where, xy)
                continue
            stats = PolygonStats.of(xy, poly)
            originals.append(stats)
            if not geometry.identity:
                stats = PolygonStats.of(geometry.transform(xy))
            lo, hi = stats.lo, stats.hi
            if lo[0] < 0 or lo[1] < 0 or hi[0] > width or hi[1] > height:
                self.report.add(
                    "out_of_bounds",
                    where,
                    f"x [{lo[0]:g}, {hi[0]:g}], y [{lo[1]:g}, {hi[1]:g}] in {width}x{height}",
                )
                out_of_bounds = True
                if self.policy.out_of_bounds != "fix":
                    continue
                clipped = clip_polygon(stats.xy, width, height)
                if len(clipped) < 3:
                    self.report.add("zero_area", where, "nothing left inside the image")
                    continue
                stats = PolygonStats.of(clipped)
            if stats.is_degenerate():
                self.report.add("zero_area", where, f"{len(stats.xy)} collinear points")
                continue
            cleaned.append(stats)
        if (out_of_bounds and self.policy.out_of_bounds == "skip") or not cleaned:
            return None, originals
        return cleaned, originals

    def _check_area_and_bbox(self, ann, originals, where):
        """Report json area / bbox inconsistent with the json's own polygons."""
        if not originals:
            return
        area = sum(p.area for p in originals)
        json_area = ann.get("area")
        # Pixel-count areas exceed polygon areas by about half the perimeter: allow a full one.
        if (
            isinstance(json_area, (int, float))
            and abs(json_area - area) > sum(p.perimeter() for p in originals) + 1
        ):
            self.report.add("area_mismatch", where, f"json {json_area:g}, polygons {area:.1f}")
        json_bbox = ann.get("bbox")
        if isinstance(json_bbox, list) and len(json_bbox) == 4:
            bbox = union_bbox(originals)
            if max(abs(float(a) - b) for a, b in zip(json_bbox, bbox)) > 2:
                self.report.add(
                    "bbox_mismatch",
                    where,
                    f"json {json_bbox}, polygons {[round(v, 1) for v in bbox]}",
                )

    def _clean_rle(self, rle, img, geometry, where):
        """Compressed RLE in the final image frame, or None if dropped."""
        self.report.add("rle_segmentation", where)
        if list(rle.get("size", ())) != [img["height"], img["width"]] or "counts" not in rle:
            self.report.add(
                "degenerate_polygon",
                where,
                f"RLE of size {rle.get('size')} on an image of size "
                f"{[img['height'], img['width']]}",
            )
            return None
        if isinstance(rle["counts"], list):
            rle = mask_util.frPyObjects(rle, *rle["size"])
        if not geometry.identity:
            rle = geometry.transform_rle(rle)
        if isinstance(rle["counts"], bytes):
            rle = dict(rle, counts=rle["counts"].decode("ascii"))
        return rle

    def _clean_annotation(self, ann, label, img, geometry):
        where = f"{img['file_name']} ann {ann.get('id')}"
        if ann.get("iscrowd", 0):
            self.report.add("crowd_annotation", where)
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict):
            segmentation = self._clean_rle(segmentation, img, geometry, where)
            if segmentation is None:
                return None
            area = float(mask_util.area(segmentation))
            bbox = [float(v) for v in mask_util.toBbox(segmentation)]
        else:
            cleaned, originals = self._clean_polygons(segmentation, geometry, where)
            self._check_area_and_bbox(ann, originals, where)
            if cleaned is None:
                return None
            segmentation = [p.flat for p in cleaned]
            bbox = union_bbox(cleaned)
            area = sum(p.area for p in cleaned)
        return {
            "segmentation": segmentation,
            "category_id": label,
            "area": area,
            "bbox": bbox,
            "bbox_mode": BoxMode.XYWH_ABS,
            "iscrowd": int(bool(ann.get("iscrowd", 0))),
            "id": ann.get("id"),
        }

    # -- main --------------------------------------------------------------------------------
    def run(self):
        images, redirect, dropped_ids = self._image_entries()
        anns_by_image = self._annotations_by_image(images, redirect, dropped_ids)
        has_annotations = bool(self.data.get("annotations"))
        records = []
        iterator = tqdm(
            images.items(),
            desc=f"Validating {os.path.basename(self.json_file)}",
            total=len(images),
            disable=not self.policy.check_files or len(images) < _PROGRESS_MIN_IMAGES,
        )
        for image_id, img in iterator:
            geometry = self._check_file(img)
            if geometry is None:
                continue
            annotations = []
            for ann in anns_by_image.get(image_id, []):
                label = self.mapping.category_id_to_label[ann["category_id"]]
                clean = self._clean_annotation(ann, label, img, geometry)
                if clean is not None:
                    annotations.append(clean)
            if has_annotations and not annotations:
                self.report.add("image_without_annotations", img["file_name"])
            records.append(
                {
                    "file_name": os.path.abspath(os.path.join(self.image_root, img["file_name"])),
                    "height": geometry.height,
                    "width": geometry.width,
                    "image_id": image_id,
                    "annotations": annotations,
                }
            )
        return records


def load_coco_semseg_json(
    json_file,
    image_root,
    policy=None,
    category_id_to_label=None,
    max_examples=5,
    uncovered="background",
):
    """Load a COCO-polygon json as semantic-segmentation records, validating it.

    Args:
        json_file (str): COCO json.
        image_root (str): folder the images' ``file_name`` are relative to.
        policy (ValidationPolicy, CfgNode, dict or None): see :class:`ValidationPolicy`.
        category_id_to_label (dict or None): fixed json category id -> label mapping (default:
            contiguous labels 1..K in id order, background-named categories -> 0).
        max_examples (int): examples kept per problem in the report.
        uncovered (str): what pixels no annotation covers are, see
            :func:`~mask2former.data.coco.categories.build_category_mapping`.

    Returns:
        CocoSemSegData: ``records`` (Detectron2 dicts: file_name, height, width, image_id,
        annotations with polygon ``segmentation``, label ``category_id``, polygon ``area``,
        ``bbox``, ``iscrowd``, ``id``), the category mapping, ``has_ground_truth`` and the
        report (already logged).

    Raises:
        ValueError: for a malformed json, or a problem whose policy is "error" (the message
            names the json file, the problems and examples).
    """
    policy = ValidationPolicy.from_cfg(policy)
    report = ValidationReport(json_file, policy, max_examples)
    data = read_coco_json(json_file)
    mapping = build_category_mapping(
        data.get("categories", []), json_file, category_id_to_label, report, uncovered
    )
    records = _CocoValidator(data, json_file, image_root, policy, mapping, report).run()
    report.log()
    report.raise_if_fatal()
    return CocoSemSegData(records, mapping, bool(data.get("annotations")), report)
