"""A self-contained HTML report of a dataset and, optionally, a model's predictions on it.

* :mod:`.dataset_stats`: class distribution, objects per image, object sizes;
* :mod:`.evaluation`: a prediction sink keeping the confusion matrix and the worst images;
* :mod:`.charts`: histogram pictures (PNG bytes);
* :mod:`.page`: the HTML page (inline CSS, images as data URIs);
* :mod:`.build`: putting it together from a config (:func:`build_report`).
"""

from .build import build_report, write_report
from .dataset_stats import DatasetStatistics, dataset_statistics
from .evaluation import EvaluationSink, ModelEvaluation

__all__ = [
    "DatasetStatistics",
    "EvaluationSink",
    "ModelEvaluation",
    "build_report",
    "dataset_statistics",
    "write_report",
]
