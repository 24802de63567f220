"""Datasets, COCO validation, polygon rasterisation, train mapper and copy-paste bank."""
from .coco_validation import (
    PROBLEMS,
    CocoSemSegData,
    ValidationPolicy,
    ValidationReport,
    load_coco_semseg_json,
)
from .datasets import (
    TRASH_CLASSES,
    TRASH_COLORS,
    default_palette,
    register_coco_semseg,
    register_dataset,
    register_labelmap_semseg,
    register_trash_dataset,
)
from .kfold import iterative_stratification, write_kfold_splits
from .labelmap_to_coco import label_map_to_annotations, labelmaps_to_coco
from .mapper import MaskFormerSemanticDatasetMapper
from .mode_filter import mode_filter
from .pseudo_labels import register_pseudo_label_dataset
from .rasterize import DRAW_ORDERS, polygons_to_label_map, record_to_label_map
from .registration import register_datasets_from_cfg
from .synthetic import generate_synthetic_trash

__all__ = [
    "DRAW_ORDERS",
    "PROBLEMS",
    "TRASH_CLASSES",
    "TRASH_COLORS",
    "CocoSemSegData",
    "MaskFormerSemanticDatasetMapper",
    "ValidationPolicy",
    "ValidationReport",
    "default_palette",
    "generate_synthetic_trash",
    "iterative_stratification",
    "label_map_to_annotations",
    "labelmaps_to_coco",
    "load_coco_semseg_json",
    "mode_filter",
    "polygons_to_label_map",
    "record_to_label_map",
    "register_coco_semseg",
    "register_dataset",
    "register_datasets_from_cfg",
    "register_labelmap_semseg",
    "register_pseudo_label_dataset",
    "register_trash_dataset",
    "write_kfold_splits",
]
