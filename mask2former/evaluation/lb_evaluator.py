"""LB-style semantic segmentation evaluation (the trash competition's leaderboard definition).

One confusion matrix (rows = ground truth, columns = prediction) is accumulated over all images
of a split; IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes that occur in the ground
truth or the prediction (a class absent from both is NaN and ignored, a class in the ground truth
that is never predicted counts 0). Background (label 0) is a class like any other; pixels with
the ignore label are excluded.

The pure functions (:func:`confusion_matrix`, :func:`metrics_from_confusion_matrix`) are shared
with the tools that score saved predictions (ensembles, CRF).
"""

import functools
import itertools
import json
import logging
import os
from collections import OrderedDict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

from ..data.masks.rasterize import record_to_label_map
from ..utils import visualize
from ..utils.io import atomic_write

__all__ = [
    "LBSemSegEvaluator",
    "confusion_matrix",
    "class_iou",
    "nanmean",
    "metrics_from_confusion_matrix",
]

logger = logging.getLogger(__name__)


def confusion_matrix(gt, pred, num_classes, ignore_label=None):
    """Confusion matrix of one image (or any pair of label arrays).

    Args:
        gt: integer ground-truth labels in [0, num_classes) or ``ignore_label``.
        pred: integer predicted labels in [0, num_classes), same shape as ``gt``.
        num_classes: K.
        ignore_label: ground-truth value excluded from the counts (None: nothing ignored).

    Returns:
        (K, K) int64 array; entry (i, j) = number of pixels of ground-truth class i predicted as
        class j. Matrices of several images add up (``total += confusion_matrix(...)``).

    Raises:
        ValueError: shapes differ, or a label is out of range.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} shapes differ")
    if ignore_label is not None:
        valid = gt != ignore_label
        if not valid.all():
            gt = gt[valid]
            pred = pred[valid]
    if gt.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    for name, labels in (("ground-truth", gt), ("predicted", pred)):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} label out of range [0, {num_classes}): found values in [{low}, {high}]"
                + (f" (ignore label {ignore_label})" if name == "ground-truth" else "")
            )
    index = gt.astype(np.int64).ravel() * num_classes + pred.ravel()
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def class_iou(cm):
    """Per-class IoU = TP / (TP + FP + FN) of a confusion matrix; NaN where TP + FP + FN = 0."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - np.diag(cm)
    return np.divide(tp, union, out=np.full(tp.shape, np.nan), where=union > 0)


def nanmean(values):
    """Mean of the finite entries of ``values``; NaN (without a warning) if there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def metrics_from_confusion_matrix(cm):
    """All LB-style metrics of a confusion matrix (rows = ground truth, columns = prediction).

    Returns:
        dict with, as fractions in [0, 1]:

        * ``"IoU"``: (K,) per-class IoU, NaN for classes absent from ground truth and prediction;
        * ``"ACC"``: (K,) per-class accuracy TP / GT pixels, NaN for classes absent from the GT;
        * ``"mIoU"``: nanmean of IoU (the leaderboard score);
        * ``"pACC"``: pixel accuracy, trace / total;
        * ``"mACC"``: nanmean of ACC;
        * ``"fwIoU"``: sum over classes of (GT pixels / total) * IoU;

        and the int64 (K,) arrays ``"gt_pixels"`` (row sums), ``"pred_pixels"`` (column sums).
        Scalars are NaN for an empty matrix.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm)
    gt_pixels = cm.sum(axis=1)
    pred_pixels = cm.sum(axis=0)
    total = int(gt_pixels.sum())
    iou = class_iou(cm)
    acc = np.divide(
        tp.astype(np.float64), gt_pixels, out=np.full(tp.shape, np.nan), where=gt_pixels > 0
    )
    present = gt_pixels > 0
    if total:
        pixel_acc = float(tp.sum() / total)
        fw_iou = float((gt_pixels[present] * iou[present]).sum() / total)
    else:
        pixel_acc = fw_iou = float("nan")
    return {
        "IoU": iou,
        "ACC": acc,
        "mIoU": nanmean(iou),
        "pACC": pixel_acc,
        "mACC": nanmean(acc),
        "fwIoU": fw_iou,
        "gt_pixels": gt_pixels,
        "pred_pixels": pred_pixels,
    }


def _json_number(value):
    """float for JSON: NaN becomes null (JSON has no NaN)."""
    value = float(value)
    return value if np.isfinite(value) else None


class LBSemSegEvaluator(DatasetEvaluator):
    """Detectron2 evaluator computing the competition leaderboard's mIoU and companions.

    All metrics are **fractions in [0, 1]** like the competition leaderboard (not percentages
    like Detectron2's ``SemSegEvaluator``). :meth:`evaluate` returns, on the main process::

        OrderedDict(sem_seg={"mIoU", "mIoU_per_image", "pACC", "mACC", "fwIoU",
                             "IoU-<class name>" for every class (NaN if absent from GT and
                             prediction)})

    * ``mIoU``: from one confusion matrix accumulated over the whole split (the LB score);
    * ``mIoU_per_image``: mIoU of each image (same NaN rule inside the image), averaged over
      images (images without any non-ignored pixel are skipped);
    * ``pACC`` pixel accuracy, ``mACC`` mean class accuracy, ``fwIoU`` frequency-weighted IoU.

    Ground truth comes from the dataset records (``DatasetCatalog.get(dataset_name)``, matched to
    ``inputs[i]["file_name"]``) through ``gt_loader``; predictions are the argmax of
    ``outputs[i]["sem_seg"]`` ([K, H, W] scores at the original image size). With an
    ``output_dir``, ``lb_metrics.json`` (metrics, per-class table, raw confusion matrix, per-image
    mIoU) and ``confusion_matrix.png`` are written there atomically.
    """

    def __init__(
        self,
        dataset_name,
        distributed=True,
        output_dir=None,
        *,
        gt_loader=None,
        plot_confusion_matrix=True,
    ):
        """
        Args:
            dataset_name (str): registered dataset with metadata ``stuff_classes`` (label order,
                background at 0) and optionally ``ignore_label`` (default: nothing ignored),
                ``draw_order`` and ``has_ground_truth``.
            distributed (bool): gather the statistics of all processes in :meth:`evaluate`
                (only the main process returns results); False evaluates this process alone.
            output_dir (str or None): folder for ``lb_metrics.json`` / ``confusion_matrix.png``.
            gt_loader (callable or None): ``record -> (H, W) label map``; default
                ``mask2former.data.masks.record_to_label_map`` with the metadata's
                ``draw_order``.
            plot_confusion_matrix (bool): write ``confusion_matrix.png`` into ``output_dir``.
        """
        metadata = MetadataCatalog.get(dataset_name)
        if not metadata.get("has_ground_truth", True):
            raise ValueError(f"dataset {dataset_name!r} has no ground truth: it cannot be scored")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._plot_confusion_matrix = plot_confusion_matrix
        self._class_names = list(metadata.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore_label = metadata.get("ignore_label", None)
        if gt_loader is None:
            gt_loader = functools.partial(
                record_to_label_map, draw_order=metadata.get("draw_order", None)
            )
        self._gt_loader = gt_loader

        # file_name -> (position in the dataset, record); the position orders per-image results.
        records = DatasetCatalog.get(dataset_name)
        self._file_names = [record["file_name"] for record in records]
        self._records = {
            name: (index, record)
            for index, (name, record) in enumerate(zip(self._file_names, records))
        }
        if len(self._records) != len(records):
            raise ValueError(f"dataset {dataset_name!r} lists some file_name more than once")
        self.reset()

    def reset(self):
        self._conf_matrix = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)
        self._per_image = []  # (dataset position, image mIoU)

    def process(self, inputs, outputs):
        """Accumulate the confusion matrix of every (input, output) pair."""
        for inp, out in zip(inputs, outputs):
            file_name = inp["file_name"]
            scores = out["sem_seg"]
            if scores.ndim != 3 or scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"prediction for image {file_name!r} has shape {tuple(scores.shape)}, "
                    f"expected [{self._num_classes}, H, W] class scores"
                )
            # max(...).indices equals argmax(dim=0) (first maximal class on ties) and is several
            # times faster on CPU for a leading class dimension.
            self.add_labels(file_name, scores.max(dim=0).indices.cpu().numpy())

    def add_labels(self, file_name, labels):
        """Accumulate the confusion matrix of one predicted label map.

        Args:
            file_name (str): the image's record ``file_name``.
            labels: (H, W) integer labels 0..K-1 at the original image size (numpy array).
        """
        if file_name not in self._records:
            raise KeyError(f"image {file_name!r} is not in dataset {self._dataset_name!r}")
        index, record = self._records[file_name]
        pred = np.asarray(labels)
        if pred.ndim != 2 or not np.issubdtype(pred.dtype, np.integer):
            raise ValueError(
                f"prediction for image {file_name!r} must be an H x W integer label map, got "
                f"{pred.shape} {pred.dtype}"
            )
        gt = np.asarray(self._gt_loader(record))
        if gt.ndim != 2:
            raise ValueError(
                f"ground truth of image {file_name!r} has shape {gt.shape}, expected (H, W)"
            )
        if gt.shape != pred.shape:
            raise ValueError(
                f"prediction for image {file_name!r} is {pred.shape[0]}x{pred.shape[1]} but "
                f"its ground truth is {gt.shape[0]}x{gt.shape[1]}: predictions must be at "
                "the original image size"
            )
        try:
            image_cm = confusion_matrix(gt, pred, self._num_classes, self._ignore_label)
        except ValueError as e:
            raise ValueError(f"image {file_name!r}: {e}") from e
        self._conf_matrix += image_cm
        self._per_image.append((index, nanmean(class_iou(image_cm))))

    def evaluate(self):
        """Compute the metrics (see the class docstring); None on non-main processes."""
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((self._conf_matrix, self._per_image), dst=0)
            if not comm.is_main_process():
                return None
            conf_matrix = np.sum([cm for cm, _ in gathered], axis=0)
            per_image = list(itertools.chain.from_iterable(images for _, images in gathered))
        else:
            conf_matrix, per_image = self._conf_matrix, self._per_image
        if not per_image:
            logger.warning(f"LBSemSegEvaluator on {self._dataset_name}: no predictions received")
            return OrderedDict()
        per_image = sorted(per_image)
        num_repeated = len(per_image) - len({index for index, _ in per_image})
        if num_repeated:
            logger.warning(f"{num_repeated} image(s) were evaluated more than once")

        metrics = metrics_from_confusion_matrix(conf_matrix)
        image_mious = np.array([miou for _, miou in per_image])
        results = OrderedDict(
            mIoU=metrics["mIoU"],
            mIoU_per_image=nanmean(image_mious),
            pACC=metrics["pACC"],
            mACC=metrics["mACC"],
            fwIoU=metrics["fwIoU"],
        )
        for name, iou in zip(self._class_names, metrics["IoU"]):
            results[f"IoU-{name}"] = float(iou)
        self._log(results, metrics, len(per_image), int(np.isnan(image_mious).sum()))
        if self._output_dir:
            self._write_outputs(results, metrics, conf_matrix, per_image)
        return OrderedDict(sem_seg=results)

    def _log(self, results, metrics, num_images, num_empty):
        rows = [
            (name, f"{iou:.4f}", int(gt), int(pred))
            for name, iou, gt, pred in zip(
                self._class_names, metrics["IoU"], metrics["gt_pixels"], metrics["pred_pixels"]
            )
        ]
        table = tabulate(
            rows, headers=["class", "IoU", "GT pixels", "predicted pixels"], tablefmt="pipe"
        )
        summary = {k: results[k] for k in ("mIoU", "mIoU_per_image", "pACC", "mACC", "fwIoU")}
        logger.info(
            f"LB-style evaluation of {self._dataset_name} ({num_images} images"
            + (f", {num_empty} without non-ignored pixels" if num_empty else "")
            + f"):\n{table}\n"
            + create_small_table(summary)
        )

    def _write_outputs(self, results, metrics, conf_matrix, per_image):
        names = self._class_names
        document = {
            "dataset": self._dataset_name,
            "num_images": len(per_image),
            "metrics": {k: _json_number(v) for k, v in results.items()},
            "per_class": [
                {
                    "class": name,
                    "IoU": _json_number(iou),
                    "ACC": _json_number(acc),
                    "gt_pixels": int(gt),
                    "pred_pixels": int(pred),
                }
                for name, iou, acc, gt, pred in zip(
                    names,
                    metrics["IoU"],
                    metrics["ACC"],
                    metrics["gt_pixels"],
                    metrics["pred_pixels"],
                )
            ],
            "class_names": names,
            "confusion_matrix": conf_matrix.tolist(),
            "confusion_matrix_axes": "rows = ground truth, columns = prediction",
            "per_image": [
                {"file_name": self._file_names[index], "mIoU": _json_number(miou)}
                for index, miou in per_image
            ],
        }
        with atomic_write(os.path.join(self._output_dir, "lb_metrics.json"), "w") as f:
            json.dump(document, f, indent=1)
        if self._plot_confusion_matrix:
            visualize.plot_confusion_matrix(
                conf_matrix,
                names,
                os.path.join(self._output_dir, "confusion_matrix.png"),
                title=f"{self._dataset_name}: mIoU {results['mIoU']:.4f}",
            )
