"""Per-class pixel frequencies of a set of dataset records, and class weights derived from them.

Every record is turned into its ground-truth label map with the project's rasteriser
(:func:`mask2former.data.masks.rasterize.record_to_label_map`: the label PNG when the record has
one, otherwise its polygons drawn in the configured order), at the record's own resolution,
before any augmentation. Pixels with the ignore label are not counted.

``inverse_sqrt_frequency`` weights: with ``f_c`` the fraction of the labelled pixels that have
class ``c``, ``w_c`` is proportional to ``1 / sqrt(f_c)`` and the weights are scaled so that
their mean over the classes present is 1. A class with no pixel at all gets weight 1.
"""

import logging
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from tabulate import tabulate

from .masks.rasterize import record_to_label_map

__all__ = [
    "dataset_class_weights",
    "inverse_sqrt_frequency_weights",
    "pixel_class_counts",
]

logger = logging.getLogger(__name__)


# Values of MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE.
def _record_name(record: dict) -> str:
    return str(record.get("sem_seg_file_name", record.get("file_name", record.get("image_id"))))


def pixel_class_counts(
    records: Iterable[dict], num_classes: int, ignore_label: int, draw_order: Optional[str] = None
) -> np.ndarray:
    """
    Number of pixels of each class in the label maps of ``records``.

    Args:
        records: dataset records (Detectron2 format) with "sem_seg_file_name" or "annotations".
        num_classes: K; labels must be in [0, K) or ``ignore_label``.
        ignore_label: label of the pixels that are not counted.
        draw_order: polygon draw order (see ``record_to_label_map``); None = its default.

    Returns:
        int64 [K] pixel counts.

    Raises:
        ValueError: naming the record, when a label map holds a value outside [0, K) that is not
            the ignore label.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in records:
        label = np.asarray(record_to_label_map(record, draw_order=draw_order)).astype(np.int64)
        label = label[label != ignore_label]
        bad = (label < 0) | (label >= num_classes)
        if bad.any():
            raise ValueError(
                f"{_record_name(record)}: label value {int(label[bad][0])} is outside "
                f"[0, {num_classes}) and is not the ignore label {ignore_label}"
            )
        counts += np.bincount(label, minlength=num_classes)
    return counts


def inverse_sqrt_frequency_weights(counts: Sequence[int]) -> Tuple[np.ndarray, List[int]]:
    """
    ``w_c = (1 / sqrt(f_c)) / mean_{present c'} (1 / sqrt(f_c'))`` with ``f_c = counts[c] / sum``;
    classes with ``counts[c] == 0`` get 1.

    Returns:
        (float64 [K] weights, sorted list of the absent classes).

    Raises:
        ValueError: when no class has any pixel.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labelled pixel: class frequencies are undefined")
    present = counts > 0
    weights = np.ones_like(counts)
    inverse_sqrt = 1.0 / np.sqrt(counts[present] / total)
    weights[present] = inverse_sqrt / inverse_sqrt.mean()
    return weights, np.flatnonzero(~present).tolist()


def dataset_class_weights(
    dataset_names: Sequence[str],
    num_classes: int,
    ignore_label: int,
    draw_order: Optional[str] = None,
) -> List[float]:
    """
    ``inverse_sqrt_frequency`` weights of the union of the registered datasets
    ``dataset_names`` (read from the DatasetCatalog), logged as a table (class, pixel fraction,
    weight), with a log line naming the classes absent from the data (weight 1).

    Returns:
        K floats.
    """
    if not dataset_names:
        raise ValueError(
            "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE 'inverse_sqrt_frequency' needs training "
            "datasets (DATASETS.TRAIN is empty)"
        )
    records = [r for name in dataset_names for r in DatasetCatalog.get(name)]
    logger.info(
        "Class weights: counting the pixels of each class in %d records of %s",
        len(records),
        ", ".join(dataset_names),
    )
    counts = pixel_class_counts(records, num_classes, ignore_label, draw_order)
    weights, absent = inverse_sqrt_frequency_weights(counts)
    names = MetadataCatalog.get(dataset_names[0]).get("stuff_classes", None)
    if names is None or len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
    fractions = counts / counts.sum()
    rows = [
        (c, names[c], int(counts[c]), f"{fractions[c]:.6f}", f"{weights[c]:.4f}")
        for c in range(num_classes)
    ]
    table = tabulate(rows, headers=["id", "class", "pixels", "fraction", "weight"], tablefmt="pipe")
    logger.info("Class weights (inverse_sqrt_frequency, mean 1 over present classes):\n%s", table)
    if absent:
        logger.info(
            "Class weights: classes absent from %s get weight 1: %s",
            ", ".join(dataset_names),
            ", ".join(names[c] for c in absent),
        )
    return weights.tolist()
