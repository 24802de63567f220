"""Where predictions go: every sink has ``add(file_name, labels, probs=None)`` and ``close()``.

``file_name`` is the image's key (its ``file_name`` as written in the dataset's COCO json, see
:func:`~mask2former.data.catalog.common.dataset_file_names`), ``labels`` its (H, W) integer
label map at the original size, ``probs`` its [K, H, W] class probabilities when the producer has
them (a model, a soft vote). ``close()`` finishes the output and returns what it produced. The
same sinks serve ``tools/predict.py`` (one model), ``tools/ensemble.py`` (a soft vote and its
post-processing) and the pseudo-label writer's label PNGs.

* :class:`SubmissionSink`: the submission CSV;
* :class:`ProbDumpSink`: a float16 probability dump (input of ensembles and pseudo-labels);
* :class:`LabelPngSink`: one single-channel label PNG per image;
* :class:`ScoreSink`: the LB-style score against a registered dataset's ground truth;
* :class:`OverlaySink`: ``image | ground truth | prediction`` pictures of the first images.
"""

import os
from typing import List, Optional, Sequence

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image

from ..data.catalog.common import records_by_file_name
from ..data.masks.rasterize import record_to_label_map
from ..evaluation import LBSemSegEvaluator
from ..utils.io import atomic_write
from ..utils.visualize import save_panel
from .prob_dump import ProbDumpWriter
from .submission import SubmissionWriter

__all__ = [
    "LabelPngSink",
    "OverlaySink",
    "ProbDumpSink",
    "ScoreSink",
    "SubmissionSink",
    "label_png_path",
]


def label_png_path(out_dir: str, file_name: str) -> str:
    """``out_dir/<file_name without extension>.png``, mirroring the json's sub-folders."""
    norm = os.path.normpath(file_name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(
            f"file_name {file_name!r} is not a relative path: cannot place its label PNG"
        )
    return os.path.join(out_dir, os.path.splitext(norm)[0] + ".png")


class SubmissionSink:
    """Label maps -> submission CSV (rows in the order of ``file_names``, written at close)."""

    def __init__(self, path: str, file_names: Sequence[str], size: int = 256):
        self.writer = SubmissionWriter(path, list(file_names), size=size)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        self.writer.add(file_name, labels)

    def close(self) -> str:
        return self.writer.close()


class ProbDumpSink:
    """Per-image float16 probabilities (the index is written at close)."""

    def __init__(self, out_dir: str, class_names: Sequence[str], model_name: str = ""):
        self.writer = ProbDumpWriter(out_dir, class_names, model_name=model_name)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        if probs is None:
            raise ValueError(f"{file_name!r}: a probability dump needs the probabilities")
        self.writer.add(file_name, probs)

    def close(self) -> str:
        self.writer.close()
        return self.writer.out_dir


class LabelPngSink:
    """Each label map as a single-channel PNG (8-bit, 16-bit beyond 256 labels) at
    :func:`label_png_path`, written atomically."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written = 0

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> str:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"{file_name!r}: label map must be H x W uint8 / uint16, got {labels.shape} "
                f"{labels.dtype}"
            )
        path = label_png_path(self.out_dir, file_name)
        ok, encoded = cv2.imencode(".png", labels)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {path}")
        with atomic_write(path, "wb") as f:
            f.write(encoded.tobytes())
        self.written += 1
        return path

    def close(self) -> int:
        return self.written


class ScoreSink:
    """LB-style score of the label maps against a registered dataset's ground truth.

    Runs :class:`~mask2former.evaluation.LBSemSegEvaluator` (the same metrics, logged per-class
    table, ``lb_metrics.json`` and ``confusion_matrix.png`` as ``--eval-only``).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            dataset_name: registered dataset with ground truth.
            output_dir: where ``lb_metrics.json`` / ``confusion_matrix.png`` go (None: nowhere).
            class_names: the predictions' classes when they come from elsewhere (probability
                dumps); they must match the dataset's (case-insensitive).
        """
        dataset_classes = list(MetadataCatalog.get(dataset_name).stuff_classes)
        if class_names is not None and [c.lower() for c in dataset_classes] != [
            str(c).lower() for c in class_names
        ]:
            raise ValueError(
                f"dataset {dataset_name!r} has classes {dataset_classes}, the probability dumps "
                f"{list(class_names)}: they must be the same, in the same order"
            )
        self.dataset_name = dataset_name
        self._records = records_by_file_name(dataset_name)
        self._evaluator = LBSemSegEvaluator(dataset_name, distributed=False, output_dir=output_dir)
        self._evaluator.reset()

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        record = self._records.get(file_name)
        if record is None:
            raise KeyError(
                f"{file_name!r} is not an image of dataset {self.dataset_name!r} "
                "(or its validation skipped it)"
            )
        self._evaluator.add_labels(record["file_name"], labels)

    def close(self) -> dict:
        """The metrics (``mIoU``, ``mIoU_per_image``, ``pACC``, ``mACC``, ``fwIoU``,
        ``IoU-<class>``), also logged and written to ``output_dir``."""
        return dict(self._evaluator.evaluate().get("sem_seg", {}))


class OverlaySink:
    """``image | ground truth | prediction`` pictures of the first ``max_images`` images."""

    def __init__(self, out_dir: str, dataset_name: str, max_images: int = 8):
        meta = MetadataCatalog.get(dataset_name)
        self.out_dir = out_dir
        self.palette = meta.stuff_colors
        self.class_names = meta.stuff_classes
        self.has_gt = getattr(meta, "has_ground_truth", True)
        self.draw_order = getattr(meta, "draw_order", None)
        self.max_images = max_images
        self.written: List[str] = []
        self._records = records_by_file_name(dataset_name)
        os.makedirs(out_dir, exist_ok=True)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        if len(self.written) >= self.max_images:
            return
        record = self._records[file_name]
        image = read_image(record["file_name"], format="RGB")
        gt = record_to_label_map(record, self.draw_order) if self.has_gt else None
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        parent = os.path.basename(os.path.dirname(record["file_name"]))
        path = os.path.join(self.out_dir, f"{parent}_{stem}.png")
        save_panel(path, image, gt, np.asarray(labels), self.palette, self.class_names)
        self.written.append(path)

    def close(self) -> List[str]:
        return self.written
