"""Registering every dataset a config names (``DATASETS.TRASH_ROOT``, ``COCO_SEMSEG``,
``LABELMAP_SEMSEG``, ``PSEUDO_LABELS``)."""

from .coco import register_coco_semseg
from .labelmap import register_labelmap_semseg
from .pseudo import register_pseudo_labels_from_cfg
from .trash import register_trash_dataset

__all__ = ["register_datasets_from_cfg"]


def register_datasets_from_cfg(cfg):
    """Register the datasets named by ``cfg.DATASETS.TRASH_ROOT``, ``COCO_SEMSEG``,
    ``LABELMAP_SEMSEG`` and ``PSEUDO_LABELS`` (idempotent). Returns the registered names."""
    validation = cfg.DATASETS.VALIDATION
    draw_order = cfg.DATASETS.POLYGON_DRAW_ORDER
    ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    names = []
    if cfg.DATASETS.TRASH_ROOT:
        names += register_trash_dataset(
            cfg.DATASETS.TRASH_ROOT,
            cfg_validation=validation,
            draw_order=draw_order,
            ignore_label=ignore_label,
        )
    for entry in cfg.DATASETS.COCO_SEMSEG:
        if len(entry) not in (3, 4):
            raise ValueError(
                "DATASETS.COCO_SEMSEG entries are [name, json_file, image_root] or [name, "
                f"json_file, image_root, uncovered ('background' or 'ignore')], got {entry}"
            )
        name, json_file, image_root = entry[:3]
        register_coco_semseg(
            name,
            json_file,
            image_root,
            validation,
            ignore_label=ignore_label,
            draw_order=draw_order,
            uncovered=entry[3] if len(entry) == 4 else None,
        )
        names.append(name)
    for entry in cfg.DATASETS.LABELMAP_SEMSEG:
        if len(entry) != 4:
            raise ValueError(
                f"DATASETS.LABELMAP_SEMSEG entries are [name, image_dir, label_dir, num_classes or "
                f"class names], got {entry}"
            )
        name, image_dir, label_dir, classes = entry
        # classes: the number of classes (named "0".."K-1") or the list of class names.
        class_names = (
            [str(c) for c in classes]
            if isinstance(classes, (list, tuple))
            else [str(i) for i in range(int(classes))]
        )
        register_labelmap_semseg(name, image_dir, label_dir, class_names, ignore_label=ignore_label)
        names.append(name)
    return names + register_pseudo_labels_from_cfg(cfg)
