"""Running a predictor over a dataset and streaming the results to sinks.

A sink has ``add(record, image, probs)`` (``probs``: [K, H, W] probabilities at the image's size)
and ``close()``. Sinks here: submission CSV, probability dump, overlay pictures, LB-style scoring.
Nothing is accumulated per image except what a sink needs (the submission keeps 256x256 masks).
"""
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import MetadataCatalog
from tqdm import tqdm

from ..data.rasterize import record_to_label_map
from ..evaluation import LBSemSegEvaluator
from ..utils.visualize import save_panel
from .predictor import SemSegPredictor, iterate_images
from .prob_dump import ProbDumpWriter
from .submission import SubmissionWriter, coco_image_names

__all__ = [
    "EvaluationSink",
    "OverlaySink",
    "ProbDumpSink",
    "SubmissionSink",
    "json_names_by_id",
    "predict_records",
]


def json_names_by_id(dataset_name: str) -> Dict[object, str]:
    """Image id -> ``file_name`` as written in the dataset's COCO json (the submission's ids)."""
    meta = MetadataCatalog.get(dataset_name)
    json_file = getattr(meta, "json_file", None)
    if json_file is None:
        raise ValueError(f"dataset {dataset_name!r} has no COCO json (metadata json_file)")
    return dict(coco_image_names(json_file))


class SubmissionSink:
    """Argmax label maps -> submission CSV (rows in the json's order)."""

    def __init__(self, path: str, dataset_name: str, size: int = 256):
        self.names_by_id = json_names_by_id(dataset_name)
        self.writer = SubmissionWriter(path, list(self.names_by_id.values()), size=size)

    def add(self, record, image, probs):
        self.writer.add(self.names_by_id[record["image_id"]], probs.argmax(0).cpu().numpy())

    def close(self):
        return self.writer.close()


class ProbDumpSink:
    """Per-image float16 probabilities keyed by the json ``file_name``."""

    def __init__(self, out_dir: str, dataset_name: str, model_name: str = ""):
        self.names_by_id = json_names_by_id(dataset_name)
        classes = MetadataCatalog.get(dataset_name).stuff_classes
        self.writer = ProbDumpWriter(out_dir, classes, model_name=model_name)

    def add(self, record, image, probs):
        self.writer.add(self.names_by_id[record["image_id"]], probs)

    def close(self):
        self.writer.close()


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
        os.makedirs(out_dir, exist_ok=True)

    def add(self, record, image, probs):
        if len(self.written) >= self.max_images:
            return
        gt = record_to_label_map(record, self.draw_order) if self.has_gt else None
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        parent = os.path.basename(os.path.dirname(record["file_name"]))
        path = os.path.join(self.out_dir, f"{parent}_{stem}.png")
        save_panel(path, image, gt, probs.argmax(0).cpu().numpy(), self.palette, self.class_names)
        self.written.append(path)

    def close(self):
        return self.written


class EvaluationSink:
    """LB-style scoring of the predictions (the dataset must have ground truth)."""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        self.evaluator = LBSemSegEvaluator(dataset_name, distributed=False, output_dir=output_dir)
        self.evaluator.reset()

    def add(self, record, image, probs):
        inputs = {k: record[k] for k in ("file_name", "image_id", "height", "width")}
        self.evaluator.process([inputs], [{"sem_seg": probs}])

    def close(self):
        return self.evaluator.evaluate()


def predict_records(
    predictor: SemSegPredictor,
    records: Sequence[dict],
    sinks: Sequence[object],
    input_format: str = "RGB",
    progress: bool = True,
    description: str = "predict",
) -> list:
    """Feed every record's probabilities to every sink; returns the sinks' ``close()`` values.

    Sinks are closed only when every image went through (an interrupted run writes no CSV/index).
    """
    for record, image in tqdm(iterate_images(records, input_format), total=len(records),
                              desc=description, disable=not progress):
        probs = predictor(image)
        if probs.shape[1:] != image.shape[:2]:
            raise RuntimeError(f"{record['file_name']}: prediction {tuple(probs.shape)} for image {image.shape}")
        for sink in sinks:
            sink.add(record, image, probs)
    return [sink.close() for sink in sinks]
