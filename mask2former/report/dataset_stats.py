"""Dataset statistics for the report: pixels and images per class, objects per image, object
sizes.

Objects are the annotations of COCO records (size: the annotation's area) and, for records
with label maps (``sem_seg_file_name``), the 8-connected components of each class (size: the
component's pixel count). The ignore label is neither a class nor an object.
"""

import dataclasses
from typing import List, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from tqdm import tqdm

from ..data.masks.rasterize import annotation_area, record_to_label_map

__all__ = ["DatasetStatistics", "dataset_statistics", "label_map_objects"]


@dataclasses.dataclass
class DatasetStatistics:
    """What :func:`dataset_statistics` measured.

    Attributes:
        pixels_per_class, images_per_class: (K,) int64 (zeros without ground truth).
        objects_per_image: (N,) int64, one entry per image.
        object_labels, object_areas: (M,) class and size (pixels) of every object.
        object_source: "annotations" or "connected components" (or both, joined by " + ").
    """

    dataset_name: str
    class_names: List[str]
    palette: List[Tuple[int, int, int]]
    has_ground_truth: bool
    num_images: int
    pixels_per_class: np.ndarray
    images_per_class: np.ndarray
    objects_per_image: np.ndarray
    object_labels: np.ndarray
    object_areas: np.ndarray
    object_source: str


def label_map_objects(label_map, num_classes, ignore_label=None):
    """(label, pixel count) of every 8-connected component of every class in a label map."""
    objects = []
    for label in np.unique(label_map):
        label = int(label)
        if label == ignore_label or not 0 <= label < num_classes:
            continue
        mask = (label_map == label).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        objects += [(label, int(area)) for area in stats[1:count, cv2.CC_STAT_AREA]]
    return objects


def _annotation_objects(record, num_classes):
    objects = []
    for annotation in record.get("annotations", []):
        label = int(annotation["category_id"])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{record['file_name']}: annotation category {label} is outside the dataset's "
                f"{num_classes} classes"
            )
        area = annotation_area(annotation["segmentation"], record["height"], record["width"])
        objects.append((label, int(round(area))))
    return objects


def dataset_statistics(dataset_name: str, progress: bool = True) -> DatasetStatistics:
    """Measure a registered dataset (every record's ground truth is read once)."""
    meta = MetadataCatalog.get(dataset_name)
    class_names = list(meta.stuff_classes)
    num_classes = len(class_names)
    ignore_label = meta.get("ignore_label", None)
    draw_order = meta.get("draw_order", None)
    has_gt = bool(meta.get("has_ground_truth", True))
    records = DatasetCatalog.get(dataset_name)

    pixels = np.zeros(num_classes, dtype=np.int64)
    images = np.zeros(num_classes, dtype=np.int64)
    per_image, labels, areas, sources = [], [], [], set()
    for record in tqdm(records, desc=f"statistics of {dataset_name}", disable=not progress):
        if not has_gt:
            per_image.append(0)
            continue
        label_map = np.asarray(record_to_label_map(record, draw_order))
        valid = label_map[label_map != ignore_label] if ignore_label is not None else label_map
        counts = np.bincount(valid.ravel().astype(np.int64), minlength=num_classes)
        if len(counts) > num_classes:
            raise ValueError(
                f"{record.get('sem_seg_file_name', record['file_name'])}: label "
                f"{int(valid.max())} is outside the dataset's {num_classes} classes"
            )
        pixels += counts
        images += counts > 0
        if "sem_seg_file_name" in record:
            objects = label_map_objects(label_map, num_classes, ignore_label)
            sources.add("connected components")
        else:
            objects = _annotation_objects(record, num_classes)
            sources.add("annotations")
        per_image.append(len(objects))
        labels += [label for label, _ in objects]
        areas += [area for _, area in objects]
    return DatasetStatistics(
        dataset_name=dataset_name,
        class_names=class_names,
        palette=[tuple(int(v) for v in color) for color in meta.stuff_colors],
        has_ground_truth=has_gt,
        num_images=len(records),
        pixels_per_class=pixels,
        images_per_class=images,
        objects_per_image=np.asarray(per_image, dtype=np.int64),
        object_labels=np.asarray(labels, dtype=np.int64),
        object_areas=np.asarray(areas, dtype=np.int64),
        object_source=" + ".join(sorted(sources)) or "none",
    )
