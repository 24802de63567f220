"""The training records of a config: every ``DATASETS.TRAIN`` dataset, with the records that
carry no ground truth dropped when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is set.

"Empty" has its semantic-segmentation meaning: a record with a label file
(``sem_seg_file_name``: label-map and pseudo-label datasets) always has ground truth; a record
with polygon ``annotations`` is empty when all of them are crowd annotations (Detectron2's
meaning); a record with neither is empty. Detectron2's own filter decides from the first record
whether the datasets are annotated and then reads ``annotations`` of every record, which fails
(or silently filters nothing) when COCO and label-file datasets are mixed.
"""

import itertools
import logging

from detectron2.data import DatasetCatalog

__all__ = ["has_ground_truth", "train_dataset_records"]

logger = logging.getLogger(__name__)


def has_ground_truth(record):
    """Whether a record has something to learn from: a label file or a non-crowd annotation."""
    if record.get("sem_seg_file_name"):
        return True
    return any(not ann.get("iscrowd", 0) for ann in record.get("annotations", ()))


def train_dataset_records(names, filter_empty):
    """The records of the datasets ``names`` in order; with ``filter_empty`` those without
    ground truth (see :func:`has_ground_truth`) are dropped and the count is logged per dataset.

    Raises:
        ValueError: a dataset without records, or no record left after filtering.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("DATASETS.TRAIN names no dataset")
    per_dataset = []
    for name in names:
        records = DatasetCatalog.get(name)
        if not records:
            raise ValueError(f"Training dataset {name!r} has no records")
        if filter_empty:
            kept = [r for r in records if has_ground_truth(r)]
            if len(kept) < len(records):
                logger.info(
                    f"Dropped {len(records) - len(kept)} of {len(records)} images of {name!r} "
                    "without ground truth (DATALOADER.FILTER_EMPTY_ANNOTATIONS)"
                )
            records = kept
        per_dataset.append(records)
    records = list(itertools.chain.from_iterable(per_dataset))
    if not records:
        raise ValueError(f"No training image with ground truth in {', '.join(names)}")
    return records
