"""Load and validate a COCO-polygon json for semantic segmentation (SPEC 3.3).

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
"""
import json
import logging
import os
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import numpy as np
from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_util
from tabulate import tabulate
from tqdm import tqdm

from .rasterize import polygon_area

__all__ = [
    "PROBLEMS",
    "CategoryMapping",
    "CocoSemSegData",
    "ImageFileInfo",
    "ValidationPolicy",
    "ValidationReport",
    "build_category_mapping",
    "inspect_image_file",
    "load_coco_semseg_json",
    "read_coco_categories",
]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Number of images from which the file check shows a progress bar.
_PROGRESS_MIN_IMAGES = 256


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
    missing_image=Problem(
        "image file missing on disk", "missing_image", {"skip": "image dropped"}
    ),
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


@dataclass(frozen=True)
class ValidationPolicy:
    """What to do with each problem: ``"fix"``, ``"skip"`` or ``"error"`` (see :data:`PROBLEMS`
    for the policies each one accepts). Field names are the lower-case ``DATASETS.VALIDATION``
    keys."""

    duplicate_annotation_id: str = "fix"
    duplicate_image_id: str = "error"
    duplicate_file_name: str = "fix"
    orphan_annotation: str = "skip"
    degenerate_polygon: str = "skip"
    out_of_bounds: str = "fix"
    zero_area: str = "skip"
    unknown_category: str = "error"
    missing_image: str = "error"
    size_mismatch: str = "error"
    exif_rotation: str = "fix"
    # Open every image file (headers only: size, mode, EXIF orientation).
    check_files: bool = True
    # Also decode every image fully to find truncated / corrupt files (slow).
    verify_images: bool = False

    def __post_init__(self):
        for kind, problem in PROBLEMS.items():
            if problem.policy is None:
                continue
            value = getattr(self, problem.policy)
            allowed = tuple(problem.actions) + ("error",)
            if value not in allowed:
                raise ValueError(
                    f"DATASETS.VALIDATION.{problem.policy.upper()} must be one of {allowed}, "
                    f"got {value!r}"
                )

    @classmethod
    def from_cfg(cls, node):
        """Build from ``cfg.DATASETS.VALIDATION`` (a CfgNode or a dict); missing keys keep their
        defaults."""
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        values = {}
        for f in fields(cls):
            key = f.name.upper()
            if key in node:
                values[f.name] = node[key]
        return cls(**values)


class ValidationReport:
    """Counts and examples of the problems found in one json file."""

    def __init__(self, json_file, policy, max_examples=5):
        self.json_file = json_file
        self.policy = policy
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)

    def add(self, kind, where, detail=""):
        """Record one occurrence of ``kind`` (a key of :data:`PROBLEMS`) at ``where`` (e.g.
        ``"batch_01/0002.jpg ann 17"``)."""
        if kind not in PROBLEMS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(f"{where}: {detail}" if detail else str(where))

    def action(self, kind):
        """The policy applied to ``kind`` ("fix", "skip" or "error")."""
        problem = PROBLEMS[kind]
        if problem.policy is None:
            return "fix"
        return getattr(self.policy, problem.policy)

    def fatal_kinds(self):
        """Kinds found whose policy is "error"."""
        return [k for k in PROBLEMS if self.counts[k] and self.action(k) == "error"]

    def table(self, kinds=None):
        """The report as a text table (one row per problem found)."""
        rows = []
        for kind in kinds or [k for k in PROBLEMS if self.counts[k]]:
            action = self.action(kind)
            text = "ERROR" if action == "error" else f"{action}: {PROBLEMS[kind].actions[action]}"
            rows.append([kind, self.counts[kind], text, "\n".join(self.examples[kind])])
        if not rows:
            return "no problems found"
        return tabulate(rows, headers=["problem", "count", "action", "examples"], tablefmt="grid")

    def log(self, log=logger):
        if not any(self.counts.values()):
            log.info(f"Validated {self.json_file}: no problems found.")
            return
        log.warning(f"Problems found in {self.json_file}:\n{self.table()}")

    def raise_if_fatal(self):
        """Raise a ValueError listing every problem whose policy is "error"."""
        fatal = self.fatal_kinds()
        if fatal:
            lines = [
                f"{k} ({self.counts[k]}): {PROBLEMS[k].description} "
                f"[DATASETS.VALIDATION.{PROBLEMS[k].policy.upper()} = 'error']"
                for k in fatal
            ]
            raise ValueError(
                f"Invalid COCO json {self.json_file}:\n  "
                + "\n  ".join(lines)
                + "\n"
                + self.table(fatal)
            )

    def __str__(self):
        return f"ValidationReport({self.json_file}):\n{self.table()}"


# ---------------------------------------------------------------------------------- categories


@dataclass
class CategoryMapping:
    """json category id -> contiguous label, and class names indexed by label."""

    category_id_to_label: Dict[int, int]
    class_names: List[str]
    background_ids: Tuple[int, ...] = ()


def _is_background_name(name):
    return str(name).strip().strip("_- ").lower() == "background"


def build_category_mapping(categories, json_file, category_id_to_label=None, report=None):
    """Map json categories to labels.

    Args:
        categories (list[dict]): the json's "categories".
        json_file (str): for error messages.
        category_id_to_label (dict or None): a fixed mapping (e.g. the trash classes); json
            categories outside it (other than background-named ones) are an error.
        report (ValidationReport or None): receives the background / remap lines.
    """
    seen = {}
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(f"{json_file}: invalid category entry {cat!r} (needs int id and name)")
        if cat["id"] in seen:
            raise ValueError(f"{json_file}: category id {cat['id']} is defined twice")
        seen[cat["id"]] = str(cat["name"])
    background = tuple(cid for cid, name in seen.items() if _is_background_name(name))
    for cid in background:
        if report is not None:
            report.add("background_category", f"category {cid} {seen[cid]!r}", "-> label 0")
    real = sorted(cid for cid in seen if cid not in background)
    if category_id_to_label is not None:
        unexpected = [cid for cid in real if cid not in category_id_to_label]
        if unexpected:
            raise ValueError(
                f"{json_file}: categories {[(c, seen[c]) for c in unexpected]} are not among the "
                f"expected categories {sorted(category_id_to_label)}"
            )
        return CategoryMapping(dict(category_id_to_label), [], background)
    mapping = {cid: i + 1 for i, cid in enumerate(real)}
    for cid in background:
        mapping[cid] = 0
    if report is not None:
        for cid in real:
            if mapping[cid] != cid:
                report.add("category_remap", f"category {cid} {seen[cid]!r}", f"-> label {mapping[cid]}")
    names = ["Background"] + [seen[cid] for cid in real]
    return CategoryMapping(mapping, names, background)


def read_coco_categories(json_file, category_id_to_label=None):
    """Category mapping and whether the json has ground truth, without validating the rest."""
    data = _read_json(json_file)
    if "pseudo_labels" in data:
        # its polygons leave out the ignored (not confident) pixels: read as a plain COCO json
        # they would silently become background
        raise ValueError(
            f"{json_file} is a pseudo-label split (tools/pseudo_label.py): register it with "
            "DATASETS.PSEUDO_LABELS, which reads its label PNGs with their ignored pixels"
        )
    mapping = build_category_mapping(data.get("categories", []), json_file, category_id_to_label)
    return mapping, bool(data.get("annotations"))


def _read_json(json_file):
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file}: not a COCO json (no 'images' list)")
    return data


# ---------------------------------------------------------------------------------- image files


@dataclass
class ImageFileInfo:
    """What the header of an image file says. ``size`` is (width, height) after the EXIF
    orientation (what ``detectron2.data.detection_utils.read_image`` returns)."""

    raw_size: Tuple[int, int] = (0, 0)
    orientation: int = 1
    mode: str = ""
    error: Optional[str] = None

    @property
    def size(self):
        w, h = self.raw_size
        return (h, w) if self.orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


def inspect_image_file(path, verify=False):
    """Read an image header (lazy PIL open); with ``verify`` also decode it fully, which finds
    truncated and corrupt files. Never raises for a bad file: ``error`` says what is wrong."""
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            info = ImageFileInfo(tuple(img.size), orientation, img.mode)
            if verify:
                img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return ImageFileInfo(error=f"{type(e).__name__}: {e}")
    if info.orientation not in range(1, 9):
        info.orientation = 1  # read_image ignores invalid orientation values too
    return info


# ---------------------------------------------------------------------------------- geometry


def _exif_points_to_displayed(x, y, orientation, raw_w, raw_h):
    """Map raw-frame coordinates of a transposing EXIF orientation (5..8: the only ones whose
    raw and displayed sizes differ, so the only ones a size check can detect) to the displayed
    frame (PIL's ``exif_transpose``, as applied by ``read_image``)."""
    if orientation == 5:
        return y, x
    if orientation == 6:
        return raw_h - y, x
    if orientation == 7:
        return raw_h - y, raw_w - x
    if orientation == 8:
        return y, raw_w - x
    raise ValueError(f"not a transposing EXIF orientation: {orientation}")


def _clip_polygon(xy, width, height):
    """Sutherland-Hodgman clip of a polygon (N x 2 array) to ``[0, width] x [0, height]``."""
    pts = [tuple(p) for p in xy]
    for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if not pts:
            break
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cur_in = cur[axis] <= bound if keep_below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_below else prev[axis] >= bound
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cross[axis] = bound
                out.append(tuple(cross))
            if cur_in:
                out.append(cur)
        pts = out
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _is_collinear(xy):
    """True if all points of an N x 2 array lie on one line (zero-area polygon)."""
    d = xy - xy[0]
    far = d[np.argmax((d**2).sum(1))]
    norm2 = float((far**2).sum())
    if norm2 == 0.0:
        return True
    cross = far[0] * d[:, 1] - far[1] * d[:, 0]
    return float(np.abs(cross).max()) <= 1e-9 * norm2


def _polygon_array(poly):
    """N x 2 float array of a flat polygon, or a string saying why it is invalid."""
    if not isinstance(poly, (list, tuple)):
        return f"polygon is a {type(poly).__name__}, not a list"
    if len(poly) % 2:
        return f"odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return f"{len(poly) // 2} points"
    values = np.asarray(poly)
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        return "non-numeric coordinates"
    xy = values.astype(np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        return "non-finite coordinates"
    return xy


@dataclass
class _PolygonStats:
    """A valid polygon (N x 2 array and flat list) with its extent and area."""

    xy: np.ndarray
    flat: list
    lo: Tuple[float, float]
    hi: Tuple[float, float]
    area: float

    @classmethod
    def of(cls, xy, flat=None):
        lo, hi = xy.min(0), xy.max(0)
        return cls(
            xy,
            list(flat) if flat is not None else xy.reshape(-1).tolist(),
            (float(lo[0]), float(lo[1])),
            (float(hi[0]), float(hi[1])),
            polygon_area(xy),
        )

    def is_degenerate(self):
        """Zero area: all points collinear (a figure-eight may have zero shoelace area but is
        not degenerate)."""
        extent = max(self.hi[0] - self.lo[0], self.hi[1] - self.lo[1])
        return self.area <= 1e-9 * extent * extent and _is_collinear(self.xy)

    def perimeter(self):
        closed = np.concatenate([self.xy, self.xy[:1]])
        return float(np.hypot(*np.diff(closed, axis=0).T).sum())


def _union_bbox(polygons):
    """COCO [x, y, w, h] box around :class:`_PolygonStats`."""
    x0, y0 = min(p.lo[0] for p in polygons), min(p.lo[1] for p in polygons)
    x1, y1 = max(p.hi[0] for p in polygons), max(p.hi[1] for p in polygons)
    return [x0, y0, x1 - x0, y1 - y0]


# ---------------------------------------------------------------------------------- loading


@dataclass
class CocoSemSegData:
    """Result of :func:`load_coco_semseg_json`."""

    records: List[dict]
    categories: CategoryMapping
    has_ground_truth: bool
    report: ValidationReport = field(repr=False)


@dataclass
class _ImageGeometry:
    """How annotations of one image must be transformed to match the image read from disk."""

    width: int
    height: int
    orientation: int = 1  # EXIF orientation (5..8) to apply to the annotations (raw -> displayed)
    raw_size: Tuple[int, int] = (0, 0)
    scale: Tuple[float, float] = (1.0, 1.0)

    def transform(self, xy):
        if self.orientation != 1:
            x, y = _exif_points_to_displayed(xy[:, 0], xy[:, 1], self.orientation, *self.raw_size)
            xy = np.stack([x, y], axis=1)
        if self.scale != (1.0, 1.0):
            xy = xy * np.asarray(self.scale)
        return xy

    @property
    def identity(self):
        return self.orientation == 1 and self.scale == (1.0, 1.0)

    def transform_rle(self, rle):
        mask = mask_util.decode(rle)
        if self.orientation != 1:
            img = Image.fromarray(mask)
            img = img.transpose(_PIL_EXIF_TRANSPOSE[self.orientation])
            mask = np.asarray(img)
        if self.scale != (1.0, 1.0):
            mask = np.asarray(Image.fromarray(mask).resize((self.width, self.height), Image.NEAREST))
        return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


_PIL_EXIF_TRANSPOSE = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
                raise ValueError(f"{self.json_file}: invalid image entry {img!r} (needs id and file_name)")
            for key in ("height", "width"):
                if not isinstance(img.get(key), int) or img[key] <= 0:
                    raise ValueError(
                        f"{self.json_file}: image {img['file_name']!r} has invalid {key} {img.get(key)!r}"
                    )
            by_id[img["id"]].append(img)
        dropped_ids = set()
        for image_id, entries in by_id.items():
            if len(entries) > 1:
                names = sorted({e["file_name"] for e in entries})
                self.report.add("duplicate_image_id", f"image id {image_id}", f"{len(entries)} entries: {names}")
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
        geometry = _ImageGeometry(img["width"], img["height"])
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
                    " (raw size identical: assumed annotated on the displayed image)" if ambiguous else ""
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
            return _ImageGeometry(*info.size, orientation=info.orientation, raw_size=info.raw_size)
        self.report.add("size_mismatch", name, f"json {json_size}, file {info.size}")
        if self.policy.size_mismatch != "fix":
            return None
        scale = (info.size[0] / json_size[0], info.size[1] / json_size[1])
        return _ImageGeometry(*info.size, scale=scale)

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
                    self.report.add("orphan_annotation", f"ann {ann_id}", f"image id {ann['image_id']}")
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

        Returns ``(cleaned, originals)``: :class:`_PolygonStats` of the cleaned polygons (None
        if the annotation is dropped) and of the valid polygons as found in the json (for the
        area / bbox consistency check).
        """
        if not isinstance(segmentation, list) or not segmentation:
            self.report.add("degenerate_polygon", where, "empty or missing segmentation")
            return None, []
        width, height = geometry.width, geometry.height
        cleaned, originals, out_of_bounds = [], [], False
        for poly in segmentation:
            xy = _polygon_array(poly)
            if isinstance(xy, str):
                self.report.add("degenerate_polygon", where, xy)
                continue
            stats = _PolygonStats.of(xy, poly)
            originals.append(stats)
            if not geometry.identity:
                stats = _PolygonStats.of(geometry.transform(xy))
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
                clipped = _clip_polygon(stats.xy, width, height)
                if len(clipped) < 3:
                    self.report.add("zero_area", where, "nothing left inside the image")
                    continue
                stats = _PolygonStats.of(clipped)
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
        if isinstance(json_area, (int, float)) and abs(json_area - area) > sum(p.perimeter() for p in originals) + 1:
            self.report.add("area_mismatch", where, f"json {json_area:g}, polygons {area:.1f}")
        json_bbox = ann.get("bbox")
        if isinstance(json_bbox, list) and len(json_bbox) == 4:
            bbox = _union_bbox(originals)
            if max(abs(float(a) - b) for a, b in zip(json_bbox, bbox)) > 2:
                self.report.add(
                    "bbox_mismatch", where, f"json {json_bbox}, polygons {[round(v, 1) for v in bbox]}"
                )

    def _clean_rle(self, rle, img, geometry, where):
        """Compressed RLE in the final image frame, or None if dropped."""
        self.report.add("rle_segmentation", where)
        if list(rle.get("size", ())) != [img["height"], img["width"]] or "counts" not in rle:
            self.report.add(
                "degenerate_polygon",
                where,
                f"RLE of size {rle.get('size')} on an image of size {[img['height'], img['width']]}",
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
            bbox = _union_bbox(cleaned)
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
    json_file, image_root, policy=None, category_id_to_label=None, max_examples=5
):
    """Load a COCO-polygon json as semantic-segmentation records, validating it.

    Args:
        json_file (str): COCO json.
        image_root (str): folder the images' ``file_name`` are relative to.
        policy (ValidationPolicy, CfgNode, dict or None): see :class:`ValidationPolicy`.
        category_id_to_label (dict or None): fixed json category id -> label mapping (default:
            contiguous labels 1..K in id order, background-named categories -> 0).
        max_examples (int): examples kept per problem in the report.

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
    data = _read_json(json_file)
    mapping = build_category_mapping(
        data.get("categories", []), json_file, category_id_to_label, report
    )
    records = _CocoValidator(data, json_file, image_root, policy, mapping, report).run()
    report.log()
    report.raise_if_fatal()
    return CocoSemSegData(records, mapping, bool(data.get("annotations")), report)
