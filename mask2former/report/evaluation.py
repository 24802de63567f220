"""A prediction sink for the report: the LB-style confusion matrix of a dataset and its worst
images by per-image mIoU.

Uses the leaderboard evaluator's definitions (:mod:`mask2former.evaluation`): one confusion
matrix over the split, the ignore label excluded, per-image mIoU over the classes present in
the image's ground truth or prediction.
"""

import dataclasses
import heapq
from typing import List, Tuple

import numpy as np
from detectron2.data import MetadataCatalog

from ..data.catalog.common import records_by_file_name
from ..data.masks.rasterize import record_to_label_map
from ..evaluation import class_iou, confusion_matrix, metrics_from_confusion_matrix, nanmean

__all__ = ["EvaluationSink", "ModelEvaluation"]


@dataclasses.dataclass
class ModelEvaluation:
    """What :class:`EvaluationSink` measured.

    Attributes:
        confusion: (K, K) int64, rows = ground truth, columns = prediction.
        metrics: :func:`~mask2former.evaluation.metrics_from_confusion_matrix` of ``confusion``.
        per_image: (file name, mIoU) of every image, in prediction order.
        worst: (file name, record, mIoU, predicted label map) of the worst images, lowest
            mIoU first.
    """

    confusion: np.ndarray
    metrics: dict
    per_image: List[Tuple[str, float]]
    worst: List[Tuple[str, dict, float, np.ndarray]]


class EvaluationSink:
    """``add(file_name, labels, probs=None)`` / ``close()`` / ``abort()`` sink (see
    :mod:`mask2former.inference.sinks`) returning a :class:`ModelEvaluation`; it writes
    nothing, so ``abort()`` only drops what it accumulated.

    Args:
        dataset_name: registered dataset with ground truth.
        worst_k: how many of the lowest per-image mIoU images to keep (with their predictions;
            images without any non-ignored pixel are never among them).
    """

    def __init__(self, dataset_name: str, worst_k: int = 8):
        meta = MetadataCatalog.get(dataset_name)
        if not meta.get("has_ground_truth", True):
            raise ValueError(f"dataset {dataset_name!r} has no ground truth: it cannot be scored")
        if worst_k < 0:
            raise ValueError(f"worst_k must be >= 0, got {worst_k}")
        self.dataset_name = dataset_name
        self.worst_k = int(worst_k)
        self._num_classes = len(meta.stuff_classes)
        self._ignore_label = meta.get("ignore_label", None)
        self._draw_order = meta.get("draw_order", None)
        self._records = records_by_file_name(dataset_name)
        self._confusion = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)
        self._per_image = []
        # max-heap on mIoU (negated) of the worst images; the counter breaks ties (earlier first)
        self._worst = []

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        record = self._records.get(file_name)
        if record is None:
            raise KeyError(f"{file_name!r} is not an image of dataset {self.dataset_name!r}")
        gt = np.asarray(record_to_label_map(record, self._draw_order))
        labels = np.asarray(labels)
        if gt.shape != labels.shape:
            raise ValueError(
                f"{record['file_name']}: prediction {labels.shape} and ground truth {gt.shape} "
                "sizes differ"
            )
        try:
            image_cm = confusion_matrix(gt, labels, self._num_classes, self._ignore_label)
        except ValueError as e:
            raise ValueError(f"{record['file_name']}: {e}") from e
        self._confusion += image_cm
        miou = nanmean(class_iou(image_cm))
        self._per_image.append((file_name, miou))
        if self.worst_k and np.isfinite(miou):
            entry = (-miou, -len(self._per_image), file_name, record, labels)
            if len(self._worst) < self.worst_k:
                heapq.heappush(self._worst, entry)
            else:
                heapq.heappushpop(self._worst, entry)

    def abort(self) -> None:
        self._confusion[:] = 0
        self._per_image.clear()
        self._worst.clear()

    def close(self) -> ModelEvaluation:
        ordered = sorted(self._worst, key=lambda entry: (-entry[0], -entry[1]))
        worst = [(name, record, -neg, labels) for neg, _, name, record, labels in ordered]
        return ModelEvaluation(
            confusion=self._confusion.copy(),
            metrics=metrics_from_confusion_matrix(self._confusion),
            per_image=list(self._per_image),
            worst=worst,
        )
