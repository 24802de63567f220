"""Dataset registration: the competition splits, any COCO-polygon json, label-map PNGs and
pseudo-labeled splits, one module each, and :func:`register_datasets_from_cfg` for a config."""

from .coco import register_coco_semseg
from .common import default_palette, register_dataset
from .from_cfg import register_datasets_from_cfg
from .labelmap import load_labelmap_records, register_labelmap_semseg
from .pseudo import (
    load_pseudo_label_records,
    register_pseudo_label_dataset,
    register_pseudo_labels_from_cfg,
)
from .trash import TRASH_CLASSES, TRASH_COLORS, TRASH_SPLITS, register_trash_dataset

__all__ = [
    "TRASH_CLASSES",
    "TRASH_COLORS",
    "TRASH_SPLITS",
    "default_palette",
    "load_labelmap_records",
    "load_pseudo_label_records",
    "register_coco_semseg",
    "register_dataset",
    "register_datasets_from_cfg",
    "register_labelmap_semseg",
    "register_pseudo_label_dataset",
    "register_pseudo_labels_from_cfg",
    "register_trash_dataset",
]
