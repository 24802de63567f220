"""Putting the report together: dataset statistics, and with a model the LB-style per-class
IoU table, the confusion matrix and the worst images by per-image mIoU."""

import logging
import os
from typing import Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from ..data import register_datasets_from_cfg
from ..data.catalog.common import dataset_file_names
from ..data.masks.rasterize import record_to_label_map
from ..engine import SafeCheckpointer
from ..inference.predictor import SemSegPredictor, predict_records
from ..utils.visualize import confusion_matrix_png, make_panel
from . import charts
from .dataset_stats import DatasetStatistics, dataset_statistics
from .evaluation import EvaluationSink, ModelEvaluation
from .page import ReportPage

__all__ = ["build_report", "write_report"]

logger = logging.getLogger(__name__)

# Embedded panels (image | ground truth | prediction) wider than this are shrunk, narrower
# than the minimum enlarged by an integer factor (pixels stay square blocks); in pixels.
_MAX_PANEL_WIDTH = 1140
_MIN_PANEL_WIDTH = 600
# Displayed width of the confusion matrix picture (CSS pixels).
_CONFUSION_WIDTH = 560
_JPEG_QUALITY = 90


def _fractions(values):
    values = np.asarray(values, dtype=np.float64)
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _dataset_section(page: ReportPage, stats: DatasetStatistics) -> None:
    page.heading(f"Dataset {stats.dataset_name}")
    total_objects = int(stats.objects_per_image.sum())
    page.summary_table(
        [
            ("images", stats.num_images),
            ("classes", len(stats.class_names)),
            ("ground truth", "yes" if stats.has_ground_truth else "no"),
            ("objects", f"{total_objects} ({stats.object_source})"),
        ]
    )
    if not stats.has_ground_truth:
        page.paragraph("The dataset has no ground truth: no class statistics.")
        return
    page.heading("Class distribution", 3)
    pixel_share = stats.pixels_per_class / max(int(stats.pixels_per_class.sum()), 1)
    page.class_table(
        stats.class_names,
        stats.palette,
        [
            ("pixels", stats.pixels_per_class, "int"),
            ("pixel share", pixel_share, "float"),
            ("pixels (relative to the largest class)", _fractions(stats.pixels_per_class), "bar"),
            ("images", stats.images_per_class, "int"),
            ("images (fraction of all)", stats.images_per_class / max(stats.num_images, 1), "bar"),
        ],
        table_id="class-distribution",
    )
    page.heading("Objects per image", 3)
    page.image(
        charts.objects_per_image_png(stats.objects_per_image),
        "image/png",
        "histogram of objects per image",
    )
    page.heading("Object sizes", 3)
    page.image(
        charts.object_size_png(
            stats.object_labels, stats.object_areas, stats.class_names, stats.palette
        ),
        "image/png",
        "histogram of object sizes per class",
    )


def _panel_jpeg(record, labels, stats: DatasetStatistics, draw_order) -> bytes:
    image = read_image(record["file_name"], format="RGB")
    gt = record_to_label_map(record, draw_order)
    tiles_width = 3 * image.shape[1]
    if tiles_width < _MIN_PANEL_WIDTH:  # small images: enlarge before the legend is drawn
        factor = -(-_MIN_PANEL_WIDTH // tiles_width)
        image, gt, labels = (
            np.repeat(np.repeat(a, factor, 0), factor, 1) for a in (image, gt, labels)
        )
    panel = make_panel(image, gt, labels, stats.palette, stats.class_names)
    if panel.shape[1] > _MAX_PANEL_WIDTH:
        scale = _MAX_PANEL_WIDTH / panel.shape[1]
        size = (_MAX_PANEL_WIDTH, max(1, round(panel.shape[0] * scale)))
        panel = cv2.resize(panel, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for the panel of {record['file_name']}")
    return encoded.tobytes()


def _model_section(
    page: ReportPage, stats: DatasetStatistics, result: ModelEvaluation, model_name, draw_order
) -> None:
    metrics = result.metrics
    page.heading(f"Model {model_name}")
    page.summary_table(
        [
            ("mIoU (LB)", f"{metrics['mIoU']:.4f}"),
            ("mIoU per image (mean)", f"{np.nanmean([m for _, m in result.per_image]):.4f}"),
            ("pixel accuracy", f"{metrics['pACC']:.4f}"),
            ("mean class accuracy", f"{metrics['mACC']:.4f}"),
            ("frequency-weighted IoU", f"{metrics['fwIoU']:.4f}"),
        ]
    )
    page.heading("Per-class IoU", 3)
    page.class_table(
        stats.class_names,
        stats.palette,
        [
            ("IoU", metrics["IoU"], "bar"),
            ("accuracy", metrics["ACC"], "float"),
            ("GT pixels", metrics["gt_pixels"], "int"),
            ("predicted pixels", metrics["pred_pixels"], "int"),
        ],
        table_id="class-iou",
    )
    page.paragraph(
        "IoU = TP / (TP + FP + FN) over one confusion matrix of the whole dataset; n/a: the "
        "class is in neither the ground truth nor the prediction.",
        note=True,
    )
    page.heading(f"The {len(result.worst)} worst images by per-image mIoU", 3)
    page.paragraph("image | ground truth | prediction", note=True)
    for file_name, record, miou, labels in result.worst:
        page.image(
            _panel_jpeg(record, labels, stats, draw_order),
            "image/jpeg",
            f"{file_name}: image, ground truth and prediction",
            caption=f"{file_name}: mIoU {miou:.4f}",
        )
    page.heading("Confusion matrix", 3)
    page.image(
        confusion_matrix_png(result.confusion, stats.class_names),
        "image/png",
        "confusion matrix (rows: ground truth, columns: prediction)",
        width=_CONFUSION_WIDTH,
    )


def write_report(
    output: str,
    dataset_name: str,
    predictor: Optional[SemSegPredictor] = None,
    model_name: str = "",
    input_format: str = "RGB",
    worst_k: int = 8,
    progress: bool = True,
) -> str:
    """Write the report of a registered dataset (and of ``predictor``'s predictions on it, when
    given) to ``output`` atomically; returns ``output``."""
    page = ReportPage(f"Report: {dataset_name}" + (f" / {model_name}" if model_name else ""))
    stats = dataset_statistics(dataset_name, progress=progress)
    _dataset_section(page, stats)
    if predictor is not None:
        records = DatasetCatalog.get(dataset_name)
        sink = EvaluationSink(dataset_name, worst_k)
        (result,) = predict_records(
            predictor,
            records,
            dataset_file_names(dataset_name),
            [sink],
            input_format,
            progress=progress,
            description=f"predict {dataset_name}",
        )
        draw_order = MetadataCatalog.get(dataset_name).get("draw_order", None)
        _model_section(page, stats, result, model_name, draw_order)
    page.write(output)
    logger.info("report written to %s", output)
    return output


def build_report(
    cfg,
    dataset_name: str,
    output: str,
    weights: Optional[str] = None,
    tta: bool = False,
    worst_k: int = 8,
    progress: bool = True,
) -> str:
    """:func:`write_report` for a composed config: registers the config's datasets and, with
    ``weights``, builds the model and loads them (refusing incomplete or unsafe checkpoints)."""
    register_datasets_from_cfg(cfg)
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {dataset_name!r} is not registered (set DATASETS.TRASH_ROOT, COCO_SEMSEG "
            "or LABELMAP_SEMSEG)"
        )
    predictor = None
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights} does not exist")
        model = build_model(cfg)
        SafeCheckpointer(
            model, allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION
        ).load_for_inference(weights)
        predictor = SemSegPredictor(cfg, model, tta=tta)
    return write_report(
        output,
        dataset_name,
        predictor,
        model_name=weights or "",
        input_format=cfg.INPUT.FORMAT,
        worst_k=worst_k,
        progress=progress,
    )
