"""Where predictions go: every sink has ``add(file_name, labels, probs=None)`` and ``close()``.

``file_name`` is the image's key (its ``file_name`` as written in the dataset's COCO json, see
:func:`~mask2former.data.catalog.common.dataset_file_names`), ``labels`` its (H, W) integer
label map at the original size, ``probs`` its [K, H, W] class probabilities when the producer has
them (a model, a soft vote). ``close()`` finishes the output, switches it into place and
returns what it produced; ``abort()`` drops it. Every output is built in a temporary location
next to its final one (a hidden ``.tmp_<name>.<pid>.<random>`` folder: removed by the next run
when its process is gone) and switched into place at ``close()``: a failed or killed run leaves
the previous complete result or nothing. :func:`write_predictions` feeds a run's predictions to
its sinks and closes them only when every prediction has been added. The
same sinks serve ``tools/predict.py`` (one model), ``tools/ensemble.py`` (a soft vote and its
post-processing) and the pseudo-label writer's label PNGs.

* :class:`SubmissionSink`: the submission CSV;
* :class:`ProbDumpSink`: a float16 probability dump (input of ensembles and pseudo-labels);
* :class:`LabelPngSink`: one single-channel label PNG per image;
* :class:`ScoreSink`: the LB-style score against a registered dataset's ground truth;
* :class:`OverlaySink`: ``image | ground truth | prediction`` pictures of the first images.
"""

import os
import shutil
from typing import Iterable, List, Mapping, NamedTuple, Optional, Sequence

import cv2
import numpy as np
from detectron2.data import MetadataCatalog

from ..data.catalog.common import records_by_file_name
from ..data.coco.images import read_image_file
from ..data.masks.rasterize import record_to_label_map
from ..evaluation import LBSemSegEvaluator
from ..utils.io import atomic_write, make_temporary_directory, replace_directory
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
    "output_png_path",
    "write_predictions",
]


def output_png_path(out_dir: str, file_name: str, what: str = "output") -> str:
    """``out_dir/<file_name>.png``: the json's sub-folders mirrored and the image's extension kept
    (``img/one.jpg`` -> ``img/one.jpg.png``), so that no two images share an output file."""
    norm = os.path.normpath(file_name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"file_name {file_name!r} is not a relative path: cannot place its {what}")
    return os.path.join(out_dir, norm + ".png")


def label_png_path(out_dir: str, file_name: str) -> str:
    """The label PNG of an image: ``out_dir/<file_name>.png`` (see :func:`output_png_path`)."""
    return output_png_path(out_dir, file_name, "label PNG")


class _TemporaryFolder:
    """A folder of one file per image, filled under a temporary name next to ``out_dir`` and
    switched onto ``out_dir`` (replacing a previous result) at :meth:`commit`."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.tmp_dir: Optional[str] = make_temporary_directory(self.out_dir)
        self._names: dict = {}

    def path(self, relative: str, file_name: str) -> str:
        """Temporary path of ``relative``; two images with one output file are an error."""
        if self.tmp_dir is None:
            raise RuntimeError(f"{file_name!r}: the output folder {self.out_dir} is closed")
        if relative in self._names:
            raise ValueError(
                f"{file_name!r} and {self._names[relative]!r} would share the output file "
                f"{os.path.join(self.out_dir, relative)}"
            )
        self._names[relative] = file_name
        return os.path.join(self.tmp_dir, relative)

    def commit(self) -> None:
        if self.tmp_dir is not None:
            replace_directory(self.tmp_dir, self.out_dir)
            self.tmp_dir = None

    def abort(self) -> None:
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None


class Prediction(NamedTuple):
    """One image's prediction as the sinks take it."""

    file_name: str
    labels: np.ndarray
    probs: Optional[object] = None  # [K, H, W] probabilities (tensor or array), if any


def write_predictions(predictions: Iterable, sinks: Mapping[str, object]) -> dict:
    """Add every prediction (``file_name``, ``labels``, ``probs`` attributes) to every sink, then
    close the sinks in order; returns ``{name: what its close() returned}``.

    If anything fails or the run is interrupted before all sinks are closed, the sinks not yet
    closed are aborted (their outputs keep their previous content) and the error is raised.
    """
    closed = set()
    try:
        for pred in predictions:
            for sink in sinks.values():
                sink.add(pred.file_name, pred.labels, pred.probs)
        results = {}
        for name, sink in sinks.items():
            results[name] = sink.close()
            closed.add(name)
        return results
    finally:
        for name, sink in sinks.items():
            if name not in closed:
                sink.abort()


class SubmissionSink:
    """Label maps -> submission CSV (rows in the order of ``file_names``, written at close)."""

    def __init__(self, path: str, file_names: Sequence[str], size: int = 256):
        self.writer = SubmissionWriter(path, list(file_names), size=size)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        self.writer.add(file_name, labels)

    def close(self) -> str:
        return self.writer.close()

    def abort(self) -> None:
        self.writer.discard()


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

    def abort(self) -> None:
        self.writer.abort()


class LabelPngSink:
    """Each label map as a single-channel PNG (8-bit, 16-bit beyond 256 labels) at
    :func:`label_png_path`; the folder replaces ``out_dir`` at :meth:`close`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written = 0
        self._folder = _TemporaryFolder(out_dir)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> str:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"{file_name!r}: label map must be H x W uint8 / uint16, got {labels.shape} "
                f"{labels.dtype}"
            )
        relative = os.path.relpath(label_png_path(self.out_dir, file_name), self.out_dir)
        tmp_path = self._folder.path(relative, file_name)
        ok, encoded = cv2.imencode(".png", labels)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {file_name!r}")
        with atomic_write(tmp_path, "wb") as f:
            f.write(encoded.tobytes())
        self.written += 1
        return os.path.join(self.out_dir, relative)

    def close(self) -> int:
        """Switch the complete folder into place; returns the number of PNGs."""
        self._folder.commit()
        return self.written

    def abort(self) -> None:
        self._folder.abort()


class ScoreSink:
    """LB-style score of the label maps against a registered dataset's ground truth.

    Runs :class:`~mask2former.evaluation.LBSemSegEvaluator` (the same metrics, logged per-class
    table, ``lb_metrics.json`` and ``confusion_matrix.png`` as ``--eval-only``). The files are
    written into a temporary folder and each is moved into ``output_dir`` at :meth:`close`
    (other files of ``output_dir`` are left alone).
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
        self.output_dir = os.path.abspath(output_dir) if output_dir else None
        self._records = records_by_file_name(dataset_name)
        self._tmp_dir = make_temporary_directory(self.output_dir) if output_dir else None
        self._evaluator = LBSemSegEvaluator(
            dataset_name, distributed=False, output_dir=self._tmp_dir
        )
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
        metrics = dict(self._evaluator.evaluate().get("sem_seg", {}))
        if self._tmp_dir is not None:
            os.makedirs(self.output_dir, exist_ok=True)
            for name in sorted(os.listdir(self._tmp_dir)):
                os.replace(os.path.join(self._tmp_dir, name), os.path.join(self.output_dir, name))
            self.abort()
        return metrics

    def abort(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None


class OverlaySink:
    """``image | ground truth | prediction`` pictures of the first ``max_images`` images, at
    :func:`output_png_path` (``out_dir/<file_name>.png``); the folder replaces ``out_dir`` at
    :meth:`close`."""

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
        self._folder = _TemporaryFolder(out_dir)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        if len(self.written) >= self.max_images:
            return
        record = self._records[file_name]
        image = read_image_file(record["file_name"], format="RGB")
        gt = record_to_label_map(record, self.draw_order) if self.has_gt else None
        relative = os.path.relpath(
            output_png_path(self.out_dir, file_name, "overlay"), self.out_dir
        )
        tmp_path = self._folder.path(relative, file_name)
        os.makedirs(os.path.dirname(tmp_path), exist_ok=True)
        save_panel(tmp_path, image, gt, np.asarray(labels), self.palette, self.class_names)
        self.written.append(os.path.join(self.out_dir, relative))

    def close(self) -> List[str]:
        """Switch the complete folder into place; returns the pictures' final paths."""
        self._folder.commit()
        return self.written

    def abort(self) -> None:
        self._folder.abort()
