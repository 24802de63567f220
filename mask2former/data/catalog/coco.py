"""Registration of any COCO-polygon json as a semantic-segmentation dataset.

Records: ``{"file_name": absolute path, "height", "width", "image_id": json id,
"annotations": [{"segmentation": [[x1, y1, ...], ...], "category_id": label 1..K, "area",
"bbox", "bbox_mode", "iscrowd", "id"}, ...]}`` (test splits: ``"annotations": []``), validated
by :func:`~mask2former.data.coco.load_coco_semseg_json` when first loaded.
"""

import functools
import logging
import os

from ..coco import ValidationPolicy, load_coco_semseg_json, read_coco_categories
from ..masks.rasterize import DRAW_ORDERS
from .common import EVALUATOR_TYPE, cached_records, default_palette, file_key, register_dataset

__all__ = ["register_coco_semseg"]

logger = logging.getLogger(__name__)


def _load_coco(json_file, image_root, policy, category_id_to_label):
    key = (
        "coco",
        file_key(json_file),
        os.path.abspath(image_root),
        policy,
        tuple(sorted((category_id_to_label or {}).items())),
    )

    def load():
        data = load_coco_semseg_json(json_file, image_root, policy, category_id_to_label)
        logger.info(f"Loaded {len(data.records)} images from {json_file}")
        return data.records

    return cached_records(key, load)


def register_coco_semseg(
    name,
    json_file,
    image_root,
    cfg_validation=None,
    *,
    category_id_to_label=None,
    class_names=None,
    class_colors=None,
    ignore_label=255,
    draw_order="area_desc",
):
    """Register a COCO-polygon json as a semantic-segmentation dataset.

    Args:
        name (str): dataset name.
        json_file (str): COCO json (read once here for its categories).
        image_root (str): folder the images' ``file_name`` are relative to.
        cfg_validation: ``cfg.DATASETS.VALIDATION`` (CfgNode / dict / ValidationPolicy / None).
        category_id_to_label (dict or None): fixed json id -> label mapping; default maps the
            json's categories to 1..K in id order (background-named categories to 0).
        class_names, class_colors: per label (index 0 = background); defaults from the json's
            category names and :func:`default_palette`. Required with ``category_id_to_label``.
        ignore_label (int): label of ignored pixels (only produced by padding / label maps).
        draw_order (str): polygon draw order, see :mod:`mask2former.data.masks.rasterize`.
    """
    if draw_order not in DRAW_ORDERS:
        raise ValueError(f"draw_order must be one of {DRAW_ORDERS}, got {draw_order!r}")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: no json file {json_file}")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    policy = ValidationPolicy.from_cfg(cfg_validation)
    mapping, has_ground_truth = read_coco_categories(json_file, category_id_to_label)
    if category_id_to_label is None:
        class_names = list(class_names or mapping.class_names)
    elif class_names is None:
        raise ValueError(f"Dataset {name!r}: class_names are required with category_id_to_label")
    class_colors = [tuple(c) for c in (class_colors or default_palette(len(class_names)))]
    if len(class_colors) != len(class_names):
        raise ValueError(
            f"Dataset {name!r}: {len(class_names)} classes but {len(class_colors)} colours"
        )
    loader = functools.partial(_load_coco, json_file, image_root, policy, category_id_to_label)
    metadata = dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=EVALUATOR_TYPE,
        stuff_classes=list(class_names),
        stuff_colors=class_colors,
        ignore_label=ignore_label,
        category_id_to_label=dict(mapping.category_id_to_label),
        draw_order=draw_order,
        has_ground_truth=has_ground_truth,
    )
    register_dataset(name, loader, metadata)
