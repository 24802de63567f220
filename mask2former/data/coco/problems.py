"""The catalogue of problems a COCO json can have, each with the policies it accepts.

``DATASETS.VALIDATION.<POLICY>`` chooses, per problem, ``"fix"`` (repair it), ``"skip"`` (drop
the polygon / annotation / image with a warning) or ``"error"`` (stop with a ``ValueError``).
Problems whose policy is None are always handled the same way and only reported.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["PROBLEMS", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One kind of problem: its description, its policy field (None: always handled the same
    way), the policies it accepts, and what each policy does."""

    description: str
    policy: Optional[str]
    actions: Dict[str, str]


PROBLEMS: Dict[str, Problem] = OrderedDict(
    duplicate_image_id=Problem(
        "several images share an id (their annotations cannot be attributed)",
        "duplicate_image_id",
        {"skip": "all images with that id and their annotations dropped"},
    ),
    duplicate_file_name=Problem(
        "several image entries name the same file",
        "duplicate_file_name",
        {"fix": "annotations merged onto the first entry", "skip": "later entries dropped"},
    ),
    orphan_annotation=Problem(
        "annotation points to an unknown image id",
        "orphan_annotation",
        {"skip": "annotation dropped"},
    ),
    duplicate_annotation_id=Problem(
        "annotation id used more than once",
        "duplicate_annotation_id",
        {"fix": "all kept (ids are not used for drawing)", "skip": "repeats dropped"},
    ),
    unknown_category=Problem(
        "category id not in 'categories'", "unknown_category", {"skip": "annotation dropped"}
    ),
    background_annotation=Problem(
        "annotation of a background category", None, {"fix": "dropped (background = not covered)"}
    ),
    missing_image=Problem("image file missing on disk", "missing_image", {"skip": "image dropped"}),
    unreadable_image=Problem(
        "image file unreadable or truncated", "missing_image", {"skip": "image dropped"}
    ),
    non_rgb_image=Problem(
        "image is not RGB (grayscale / RGBA / palette / CMYK ...)",
        None,
        {"fix": "converted to RGB at read time"},
    ),
    exif_rotated=Problem(
        "image has an EXIF orientation; json size matches the displayed (rotated) image",
        None,
        {"fix": "none needed: read_image applies the orientation"},
    ),
    exif_size_mismatch=Problem(
        "json size is the raw size of an EXIF-rotated image (annotations in the raw frame)",
        "exif_rotation",
        {"fix": "annotations rotated into the displayed frame", "skip": "image dropped"},
    ),
    size_mismatch=Problem(
        "image size on disk differs from the json",
        "size_mismatch",
        {"fix": "annotations scaled to the file size", "skip": "image dropped"},
    ),
    rle_segmentation=Problem(
        "segmentation is RLE, not polygons", None, {"fix": "kept, decoded with pycocotools"}
    ),
    crowd_annotation=Problem(
        "annotation has iscrowd=1", None, {"fix": "kept, painted like other annotations"}
    ),
    degenerate_polygon=Problem(
        "invalid segmentation: polygon with < 3 points, odd length, non-numeric / non-finite "
        "coordinates, empty list, or RLE of the wrong size",
        "degenerate_polygon",
        {"skip": "polygon dropped (annotation dropped if none is left)"},
    ),
    out_of_bounds=Problem(
        "polygon coordinates outside the image",
        "out_of_bounds",
        {"fix": "polygon clipped to the image", "skip": "annotation dropped"},
    ),
    zero_area=Problem(
        "polygon of zero area (all points collinear)",
        "zero_area",
        {"skip": "polygon dropped (annotation dropped if none is left)"},
    ),
    area_mismatch=Problem(
        "json area differs from the polygon area by more than the perimeter",
        None,
        {"fix": "polygon area used"},
    ),
    bbox_mismatch=Problem(
        "json bbox differs from the polygon extent by more than 2 px",
        None,
        {"fix": "bbox recomputed from the polygons"},
    ),
    background_category=Problem(
        "category named like background", None, {"fix": "mapped to label 0"}
    ),
    category_remap=Problem(
        "category ids are not 1..K (id 0 or gaps)",
        None,
        {"fix": "mapped to contiguous labels 1..K"},
    ),
    image_without_annotations=Problem(
        "image has no annotation", None, {"fix": "kept (all background)"}
    ),
)
