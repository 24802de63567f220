"""Copy-paste bank: training images with pasted objects, regenerated at every evaluation.

A bank is a folder of K images made by pasting object instances (cut out along their polygons,
visible part only) from training images onto other training images, with random scale, flip and
position and optionally alpha-blended edges. The class of each pasted object is drawn with
weights favouring weak classes (``1 - IoU_c`` of the last evaluation; uniform before the first).

Layout (never inside the original data)::

    <bank_root>/CURRENT        name of the complete, current version folder (switched atomically)
    <bank_root>/v0003/bank.json    COCO json: images (+ "sem_seg_file_name"), polygon annotations
                                   (category_id = label id) traced from the label maps
    <bank_root>/v0003/images/000000.jpg, labels/000000.png

Readers (:class:`CopyPasteSampler`, used by the train mapper in every data-loader worker) follow
``CURRENT`` at each draw, so a new bank is picked up without restarting the workers; the previous
version is kept until the next one is complete so in-flight reads never see a half-written bank.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ...utils.io import atomic_directory, atomic_write
from ..coco.images import read_image_file
from ..masks.rasterize import polygons_to_label_map, record_to_label_map
from ..masks.trace import label_map_to_annotations

__all__ = [
    "CopyPasteSampler",
    "ObjectPool",
    "class_weights_from_iou",
    "generate_bank",
    "read_current_bank",
]

logger = logging.getLogger(__name__)
CURRENT_NAME = "CURRENT"
BANK_JSON = "bank.json"


@dataclass(frozen=True)
class ObjectRef:
    record_index: int
    annotation_index: int
    label: int


class ObjectPool:
    """Pastable objects of a list of training records, grouped by label."""

    def __init__(self, records: Sequence[dict], min_area: float = 16.0):
        self.records = records
        self.by_label: Dict[int, List[ObjectRef]] = {}
        for ri, record in enumerate(records):
            for ai, ann in enumerate(record.get("annotations", [])):
                if ann.get("iscrowd", 0) or ann.get("area", min_area) < min_area:
                    continue
                label = int(ann["category_id"])
                self.by_label.setdefault(label, []).append(ObjectRef(ri, ai, label))

    @property
    def labels(self) -> List[int]:
        return sorted(self.by_label)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_label.values())


def class_weights_from_iou(
    labels: Sequence[int], iou: Optional[Dict[int, float]] = None, floor: float = 0.05
) -> np.ndarray:
    """Sampling probabilities over ``labels``: proportional to ``max(1 - IoU, floor)``.

    ``iou`` maps label -> IoU of the last evaluation (NaN or missing: the class was not scored and
    gets the mean weight of the scored ones); None gives uniform weights.
    """
    if not labels:
        raise ValueError("no pastable objects: the training set has no usable annotations")
    if iou is None:
        return np.full(len(labels), 1.0 / len(labels))
    raw = np.array([1.0 - iou[c] if c in iou and np.isfinite(iou[c]) else np.nan for c in labels])
    fill = np.nanmean(raw) if np.isfinite(raw).any() else 1.0
    weights = np.maximum(np.where(np.isfinite(raw), raw, fill), floor)
    return weights / weights.sum()


def _cut_object(record: dict, ann: dict, label_map: np.ndarray, image: np.ndarray):
    """Image patch and visible-pixel mask of one annotation, cropped to its bounding box."""
    height, width = label_map.shape
    coords = np.concatenate(
        [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in ann["segmentation"]]
    )
    x0, y0 = np.floor(coords.min(0)).astype(int).clip(0, [width - 1, height - 1])
    x1, y1 = np.ceil(coords.max(0)).astype(int).clip(0, [width - 1, height - 1]) + 1
    shifted = {
        "segmentation": [
            (np.asarray(p, dtype=np.float64).reshape(-1, 2) - [x0, y0]).ravel().tolist()
            for p in ann["segmentation"]
        ],
        "category_id": 1,
        "area": ann.get("area", 0.0),
    }
    own = polygons_to_label_map([shifted], int(y1 - y0), int(x1 - x0)) == 1
    visible = own & (label_map[y0:y1, x0:x1] == ann["category_id"])
    return image[y0:y1, x0:x1], visible


def paste(
    image: np.ndarray,
    label_map: np.ndarray,
    patch: np.ndarray,
    mask: np.ndarray,
    label: int,
    rng: np.random.Generator,
    scale_range: Tuple[float, float],
    blend_sigma: float,
) -> bool:
    """Paste ``patch`` (its ``mask`` pixels) into ``image``/``label_map`` in place; False if the
    object became too small to paste."""
    th, tw = label_map.shape
    ph, pw = mask.shape
    scale = rng.uniform(*scale_range)
    scale = min(scale, th / ph, tw / pw)
    nh, nw = int(round(ph * scale)), int(round(pw * scale))
    if nh < 2 or nw < 2:
        return False
    patch = cv2.resize(patch, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    if not mask.any():
        return False
    if rng.random() < 0.5:
        patch, mask = patch[:, ::-1], mask[:, ::-1]
    y = int(rng.integers(0, th - nh + 1))
    x = int(rng.integers(0, tw - nw + 1))
    region = image[y : y + nh, x : x + nw]
    if blend_sigma > 0:
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), blend_sigma) * mask
    else:
        alpha = mask.astype(np.float32)
    alpha = alpha[..., None]
    region[...] = (alpha * patch + (1.0 - alpha) * region).round().astype(np.uint8)
    label_map[y : y + nh, x : x + nw][mask] = label
    return True


def _next_version(bank_root: str) -> str:
    versions = [d for d in os.listdir(bank_root) if d.startswith("v") and d[1:].isdigit()]
    return f"v{max([int(d[1:]) for d in versions], default=-1) + 1:04d}"


def generate_bank(
    records: Sequence[dict],
    bank_root: str,
    num_images: int,
    class_probs: Optional[Dict[int, float]] = None,
    seed: int = 0,
    objects_per_image: Tuple[int, int] = (1, 3),
    scale_range: Tuple[float, float] = (0.5, 1.5),
    blend_sigma: float = 0.0,
    draw_order: str = "area_desc",
    pool: Optional[ObjectPool] = None,
    max_tries: int = 20,
    class_names: Optional[Sequence[str]] = None,
    ignore_label: int = 255,
    background: Optional[int] = 0,
) -> str:
    """Write a new bank version under ``bank_root`` and make it current. Returns its folder.

    ``class_probs`` maps label -> IoU of the last evaluation (None: uniform class choice).
    ``class_names`` (index = label id) names the json's categories; pixels of ``ignore_label``
    (e.g. unconfident pseudo-label pixels of a target image) stay ignored in the bank's label
    PNGs and get no polygon, as do the uncovered pixels of records of datasets whose uncovered
    pixels are ignored (``record["uncovered_label"]``). ``background`` is the label of the
    Background class (no polygon, no category), None for datasets whose labels are all
    classes. Deterministic for fixed records, IoUs and seed.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    pool = pool or ObjectPool(records)
    labels = pool.labels
    probs = class_weights_from_iou(labels, class_probs)
    rng = np.random.default_rng(seed)
    os.makedirs(bank_root, exist_ok=True)
    version = _next_version(bank_root)
    final_dir = os.path.join(bank_root, version)
    with atomic_directory(final_dir, overwrite=False, prefix=".building-") as tmp_dir:
        os.makedirs(os.path.join(tmp_dir, "images"))
        os.makedirs(os.path.join(tmp_dir, "labels"))
        images, annotations, pasted_per_class = [], [], np.zeros(len(labels), dtype=np.int64)
        for i in range(num_images):
            target = records[int(rng.integers(len(records)))]
            image = read_image_file(target["file_name"], format="RGB").copy()
            label_map = record_to_label_map(target, draw_order=draw_order).astype(np.uint8)
            n_objects = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
            for _ in range(n_objects):
                for _attempt in range(max_tries):
                    li = int(rng.choice(len(labels), p=probs))
                    refs = pool.by_label[labels[li]]
                    ref = refs[int(rng.integers(len(refs)))]
                    src = records[ref.record_index]
                    src_image = read_image_file(src["file_name"], format="RGB")
                    src_labels = record_to_label_map(src, draw_order=draw_order)
                    patch, mask = _cut_object(
                        src, src["annotations"][ref.annotation_index], src_labels, src_image
                    )
                    if mask.sum() >= 4 and paste(
                        image, label_map, patch, mask, ref.label, rng, scale_range, blend_sigma
                    ):
                        pasted_per_class[li] += 1
                        break
            name = f"{i:06d}"
            cv2.imwrite(
                os.path.join(tmp_dir, "images", name + ".jpg"),
                image[:, :, ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
            cv2.imwrite(os.path.join(tmp_dir, "labels", name + ".png"), label_map)
            for ann in label_map_to_annotations(
                label_map, ignore_label=ignore_label, background=background
            ):
                annotations.append({"id": len(annotations) + 1, "image_id": i, **ann})
            images.append(
                {
                    "id": i,
                    "file_name": f"images/{name}.jpg",
                    "sem_seg_file_name": f"labels/{name}.png",
                    "height": int(label_map.shape[0]),
                    "width": int(label_map.shape[1]),
                    "source_file_name": target["file_name"],
                }
            )
            if (i + 1) % 100 == 0 or i + 1 == num_images:
                logger.info("copy-paste bank: %d / %d images", i + 1, num_images)
        categories = [
            {"id": c, "name": class_names[c] if class_names else str(c)}
            for c in range(len(class_names) if class_names else max(labels) + 1)
            if c != background
        ]
        bank = {
            "images": images,
            "annotations": annotations,
            "categories": categories,
            "class_probs": {str(c): float(p) for c, p in zip(labels, probs)},
            "pasted_per_class": {str(c): int(n) for c, n in zip(labels, pasted_per_class)},
            "seed": seed,
        }
        with open(os.path.join(tmp_dir, BANK_JSON), "w") as f:
            json.dump(bank, f)
    previous = _current_version(bank_root)
    with atomic_write(os.path.join(bank_root, CURRENT_NAME), "w") as f:
        f.write(version + "\n")
    _remove_old_versions(bank_root, keep={version, previous})
    return final_dir


def _current_version(bank_root: str) -> Optional[str]:
    try:
        with open(os.path.join(bank_root, CURRENT_NAME)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _remove_old_versions(bank_root: str, keep) -> None:
    for d in os.listdir(bank_root):
        if d.startswith("v") and d[1:].isdigit() and d not in keep:
            shutil.rmtree(os.path.join(bank_root, d), ignore_errors=True)


def read_current_bank(bank_root: str) -> Tuple[Optional[str], List[dict]]:
    """(version, records) of the current bank; (None, []) when no bank has been written yet."""
    version = _current_version(bank_root)
    if version is None:
        return None, []
    folder = os.path.join(bank_root, version)
    with open(os.path.join(folder, BANK_JSON)) as f:
        bank = json.load(f)
    records = [
        {
            "file_name": os.path.join(folder, im["file_name"]),
            "sem_seg_file_name": os.path.join(folder, im["sem_seg_file_name"]),
            "height": im["height"],
            "width": im["width"],
            "image_id": f"copy_paste/{version}/{im['id']}",
        }
        for im in bank["images"]
    ]
    return version, records


class CopyPasteSampler:
    """Substitutes a training record by a bank record with probability ``prob``.

    Cheap to pickle (data-loader workers get a copy); follows the bank's ``CURRENT`` pointer at
    every draw and caches the records of the current version.
    """

    def __init__(self, bank_root: str, prob: float):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"copy-paste probability must be in [0, 1], got {prob}")
        self.bank_root = bank_root
        self.prob = prob
        self._version: Optional[str] = None
        self._records: List[dict] = []

    def _refresh(self) -> None:
        version = _current_version(self.bank_root)
        if version != self._version:
            self._version, self._records = read_current_bank(self.bank_root)

    def maybe_sample(self, record: dict, rng) -> dict:
        """``record`` or, with probability ``prob``, a random record of the current bank.

        ``rng`` is a ``numpy.random.Generator`` or ``random.Random``-like object with ``random()``.
        """
        if self.prob <= 0 or rng.random() >= self.prob:
            return record
        self._refresh()
        if not self._records:
            return record
        return self._records[int(rng.random() * len(self._records)) % len(self._records)]
