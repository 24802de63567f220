"""LB-style (competition leaderboard) semantic segmentation evaluation."""

from .lb_evaluator import (
    LBSemSegEvaluator,
    class_iou,
    confusion_matrix,
    metrics_from_confusion_matrix,
    nanmean,
)

__all__ = [
    "LBSemSegEvaluator",
    "class_iou",
    "confusion_matrix",
    "metrics_from_confusion_matrix",
    "nanmean",
]
