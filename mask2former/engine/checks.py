"""Start-up checks of a training config against its training data, run before the model is
built: settings that would otherwise train silently on wrong targets or crash deep in the loss.

* ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` must equal each dataset's class count (``stuff_classes``);
* training records without annotations or label file are counted (an error when no record has
  any: the model would learn only background);
* an ``INPUT.CROP.SIZE`` larger than every training image, even at the largest resize of
  ``INPUT.MIN_SIZE_TRAIN``, is reported once (the crop never crops; images are only padded).
"""

import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

__all__ = [
    "check_crop_size",
    "check_num_classes",
    "check_training_annotations",
    "run_training_checks",
]

logger = logging.getLogger(__name__)


def _describe(name):
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f"dataset {name!r}" + (f" ({json_file})" if json_file else "")


def check_num_classes(num_classes, dataset_names):
    """Raise ValueError if a dataset's ``stuff_classes`` count differs from ``num_classes``
    (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``). Datasets without ``stuff_classes`` are not checked."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("stuff_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but {_describe(name)} has "
                f"{len(classes)} classes (labels 0..{len(classes) - 1}: "
                f"{', '.join(map(str, classes[:4]))}{', ...' if len(classes) > 4 else ''}); "
                f"set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}"
            )


def _has_labels(record):
    return bool(record.get("annotations")) or bool(record.get("sem_seg_file_name"))


def check_training_annotations(records_by_dataset):
    """Warn with the count of training records that have neither annotations nor a label file;
    raise ValueError when no record of any dataset has one.

    Args:
        records_by_dataset (dict[str, list[dict]]): dataset name -> Detectron2 records.
    """
    total = labelled = 0
    for name, records in records_by_dataset.items():
        unlabelled = sum(not _has_labels(r) for r in records)
        total += len(records)
        labelled += len(records) - unlabelled
        if unlabelled:
            logger.warning(
                "%d of %d training images of %s have no annotations (their targets are all "
                "background)",
                unlabelled,
                len(records),
                _describe(name),
            )
    if labelled == 0:
        names = ", ".join(_describe(n) for n in records_by_dataset)
        raise ValueError(
            f"None of the {total} training images of {names} has an annotation or a label file: "
            'training would learn only background. Check that the json has "annotations" for '
            "its images (a test split has none)."
        )


def _image_size(record):
    if "height" in record and "width" in record:
        return record["height"], record["width"]
    with Image.open(record["file_name"]) as im:
        return im.height, im.width


def _largest_resize(height, width, short_edge, max_size):
    """Image size after Detectron2's ResizeShortestEdge to ``short_edge`` (capped by
    ``max_size`` on the long side)."""
    scale = short_edge / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def check_crop_size(cfg, records):
    """Warn once if the ``absolute`` crop is taller or wider than every training image after
    the largest resize of ``INPUT.MIN_SIZE_TRAIN`` (the crop then never crops).

    Returns:
        bool: whether it warned.
    """
    crop = cfg.INPUT.CROP
    if not crop.ENABLED or crop.TYPE not in ("absolute", "absolute_range") or not records:
        return False
    crop_h, crop_w = (crop.SIZE[0], crop.SIZE[0]) if crop.TYPE == "absolute_range" else crop.SIZE
    short_edge = max(cfg.INPUT.MIN_SIZE_TRAIN)  # "choice" and "range" sampling alike
    sizes = [
        _largest_resize(*_image_size(r), short_edge, cfg.INPUT.MAX_SIZE_TRAIN) for r in records
    ]
    if any(h >= crop_h and w >= crop_w for h, w in sizes):
        return False
    largest = max(sizes, key=lambda s: s[0] * s[1])
    logger.warning(
        "INPUT.CROP.SIZE (%d, %d) is larger than every one of the %d training images, even "
        "resized to a short side of %d (the largest of INPUT.MIN_SIZE_TRAIN): the largest is "
        "%dx%d (height x width). Crops take whole images, which are padded; lower "
        "INPUT.CROP.SIZE or raise INPUT.MIN_SIZE_TRAIN.",
        crop_h,
        crop_w,
        len(sizes),
        short_edge,
        *largest,
    )
    return True


def run_training_checks(cfg):
    """All start-up checks for training on ``cfg.DATASETS.TRAIN``."""
    names = list(cfg.DATASETS.TRAIN)
    check_num_classes(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, names)
    records_by_dataset = {name: DatasetCatalog.get(name) for name in names}
    check_training_annotations(records_by_dataset)
    check_crop_size(cfg, [r for records in records_by_dataset.values() for r in records])
