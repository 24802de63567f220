"""Registration of any COCO-polygon json as a semantic-segmentation dataset.

Records: ``{"file_name": absolute path, "height", "width", "image_id": json id,
"annotations": [{"segmentation": [[x1, y1, ...], ...], "category_id": label, "area",
"bbox", "bbox_mode", "iscrowd", "id"}, ...]}`` (test splits: ``"annotations": []``), validated
by :func:`~mask2former.data.coco.load_coco_semseg_json` when first loaded.

What the pixels no annotation covers are is a per-dataset choice (``uncovered``):
``"background"`` (labels 1..K, a Background class 0) or ``"ignore"`` (labels 0..K-1 in id
order, no Background class; the records carry ``"uncovered_label": ignore_label``, which
:func:`~mask2former.data.masks.record_to_label_map` paints where no annotation covers).
A json written by ``datasets/labelmap_to_coco.py`` records its choice in ``info.uncovered``:
registration defaults to it and refuses a contradicting choice.

A json that cannot be read does not block the registration of the other datasets: the error
(naming the file) is raised when the dataset is first loaded.
"""

import functools
import logging
import os

from ..coco import (
    ValidationPolicy,
    check_not_pseudo_labels,
    check_uncovered,
    coco_categories,
    json_uncovered,
    load_coco_semseg_json,
    read_coco_json,
)
from ..masks.rasterize import DRAW_ORDERS
from .common import EVALUATOR_TYPE, cached_records, default_palette, file_key, register_dataset

__all__ = ["register_coco_semseg", "resolve_uncovered"]

logger = logging.getLogger(__name__)


def _load_coco(json_file, image_root, policy, category_id_to_label, uncovered, ignore_label):
    key = (
        "coco",
        file_key(json_file),
        os.path.abspath(image_root),
        policy,
        tuple(sorted((category_id_to_label or {}).items())),
        uncovered,
        ignore_label,
    )

    def load():
        data = load_coco_semseg_json(
            json_file, image_root, policy, category_id_to_label, uncovered=uncovered
        )
        logger.info(f"Loaded {len(data.records)} images from {json_file}")
        if uncovered == "ignore":
            for record in data.records:
                record["uncovered_label"] = ignore_label
        return data.records

    return cached_records(key, load)


def resolve_uncovered(uncovered, data, json_file):
    """The ``uncovered`` choice of a dataset: the given one, else the json's ``info.uncovered``,
    else ``"background"``.

    Raises:
        ValueError: an unknown choice, or one that contradicts the json's ``info.uncovered``.
    """
    recorded = json_uncovered(data, json_file)
    if uncovered is None:
        return recorded or "background"
    check_uncovered(uncovered, json_file)
    if recorded is not None and recorded != uncovered:
        raise ValueError(
            f"{json_file} says its uncovered pixels are {recorded!r} (info.uncovered), the "
            f"registration asks for {uncovered!r}"
        )
    return uncovered


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
    uncovered=None,
):
    """Register a COCO-polygon json as a semantic-segmentation dataset.

    Args:
        name (str): dataset name.
        json_file (str): COCO json (read once here for its categories).
        image_root (str): folder the images' ``file_name`` are relative to.
        cfg_validation: ``cfg.DATASETS.VALIDATION`` (CfgNode / dict / ValidationPolicy / None).
        category_id_to_label (dict or None): fixed json id -> label mapping; default maps the
            json's categories to labels in id order (see ``uncovered``).
        class_names, class_colors: per label; defaults from the json's category names (with
            "Background" at 0 for ``uncovered="background"``) and :func:`default_palette`.
            Required with ``category_id_to_label``.
        ignore_label (int): label of ignored pixels (padding, label maps, uncovered pixels of
            ``uncovered="ignore"`` datasets).
        draw_order (str): polygon draw order, see :mod:`mask2former.data.masks.rasterize`.
        uncovered (str or None): ``"background"`` or ``"ignore"``, see the module docstring;
            None: the json's ``info.uncovered``, else ``"background"``.
    """
    if draw_order not in DRAW_ORDERS:
        raise ValueError(f"draw_order must be one of {DRAW_ORDERS}, got {draw_order!r}")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: no json file {json_file}")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    policy = ValidationPolicy.from_cfg(cfg_validation)
    # A broken json blocks no other dataset: the loader raises the error (naming the file)
    # when the dataset is first loaded. Configuration mistakes (a pseudo-label json, an
    # uncovered choice contradicting the json) are raised here.
    mapping = None
    try:
        data = read_coco_json(json_file)
    except ValueError as e:
        logger.warning(f"Dataset {name!r} cannot be loaded: {e}")
        data = None
    if data is not None:
        uncovered = resolve_uncovered(uncovered, data, json_file)
        check_not_pseudo_labels(data, json_file)
        try:
            mapping, has_ground_truth = coco_categories(
                data, json_file, category_id_to_label, uncovered
            )
        except ValueError as e:
            logger.warning(f"Dataset {name!r} cannot be loaded: {e}")
    if mapping is not None:
        mapping = dict(mapping.category_id_to_label), mapping.class_names
    else:
        uncovered = uncovered or "background"
        check_uncovered(uncovered, json_file)
        mapping, has_ground_truth = (dict(category_id_to_label or {}), []), None
    if category_id_to_label is None:
        class_names = list(class_names or mapping[1])
    elif class_names is None:
        raise ValueError(f"Dataset {name!r}: class_names are required with category_id_to_label")
    class_colors = [tuple(c) for c in (class_colors or default_palette(len(class_names)))]
    if len(class_colors) != len(class_names):
        raise ValueError(
            f"Dataset {name!r}: {len(class_names)} classes but {len(class_colors)} colours"
        )
    loader = functools.partial(
        _load_coco, json_file, image_root, policy, category_id_to_label, uncovered, ignore_label
    )
    metadata = dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=EVALUATOR_TYPE,
        stuff_classes=list(class_names),
        stuff_colors=class_colors,
        ignore_label=ignore_label,
        category_id_to_label=mapping[0],
        draw_order=draw_order,
        uncovered=uncovered,
    )
    if not class_names:
        # an unreadable json with classes of its own: no class list rather than an empty
        # one, so that start-up checks leave it to the loader's error
        for key in ("stuff_classes", "stuff_colors", "category_id_to_label"):
            del metadata[key]
    if has_ground_truth is not None:
        metadata["has_ground_truth"] = has_ground_truth
    register_dataset(name, loader, metadata)
