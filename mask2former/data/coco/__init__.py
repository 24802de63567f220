"""COCO-polygon json files: the one reader, the problem catalogue, validation and cleaning."""

from .categories import (
    UNCOVERED,
    CategoryMapping,
    build_category_mapping,
    check_not_pseudo_labels,
    check_uncovered,
    coco_categories,
    json_uncovered,
    read_coco_categories,
)
from .images import ImageFileInfo, inspect_image_file
from .json_file import coco_image_names, read_coco_json
from .problems import PROBLEMS, Problem
from .report import ValidationPolicy, ValidationReport
from .validator import CocoSemSegData, load_coco_semseg_json

__all__ = [
    "PROBLEMS",
    "UNCOVERED",
    "CategoryMapping",
    "CocoSemSegData",
    "ImageFileInfo",
    "Problem",
    "ValidationPolicy",
    "ValidationReport",
    "build_category_mapping",
    "check_not_pseudo_labels",
    "check_uncovered",
    "coco_categories",
    "json_uncovered",
    "inspect_image_file",
    "load_coco_semseg_json",
    "coco_image_names",
    "read_coco_categories",
    "read_coco_json",
]
