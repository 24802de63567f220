"""Registration of the competition splits: COCO-polygon jsons with the fixed 11 classes
(label value = category id, background 0)."""

import logging
import os

from .coco import register_coco_semseg

__all__ = ["TRASH_CLASSES", "TRASH_COLORS", "TRASH_SPLITS", "register_trash_dataset"]

logger = logging.getLogger(__name__)

# Label value = category id of the competition jsons; background 0.
TRASH_CLASSES = (
    "Background",
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
)
TRASH_COLORS = (
    (0, 0, 0),
    (192, 0, 128),
    (0, 128, 192),
    (0, 128, 64),
    (128, 0, 0),
    (64, 0, 128),
    (64, 0, 192),
    (192, 128, 64),
    (192, 192, 128),
    (64, 64, 128),
    (128, 0, 192),
)
TRASH_SPLITS = ("train_all", "train", "val", "test")


def register_trash_dataset(
    root, prefix="trash", cfg_validation=None, *, draw_order="area_desc", ignore_label=255
):
    """Register the competition splits found in ``root``.

    ``{prefix}_train_all``, ``{prefix}_train``, ``{prefix}_val`` and ``{prefix}_test`` are
    registered for each of ``train_all.json``, ``train.json``, ``val.json``, ``test.json`` that
    exists; image ``file_name`` are relative to ``root``. Classes and palette are the fixed 11 of
    the competition (label = category id).

    Returns:
        list[str]: the registered names.
    """
    root = os.path.abspath(root)
    names = []
    for split in TRASH_SPLITS:
        json_file = os.path.join(root, f"{split}.json")
        if not os.path.isfile(json_file):
            continue
        name = f"{prefix}_{split}"
        register_coco_semseg(
            name,
            json_file,
            root,
            cfg_validation,
            category_id_to_label={i: i for i in range(1, len(TRASH_CLASSES))},
            class_names=TRASH_CLASSES,
            class_colors=TRASH_COLORS,
            ignore_label=ignore_label,
            draw_order=draw_order,
        )
        names.append(name)
    if not names:
        logger.warning(f"No {'/'.join(TRASH_SPLITS)} json found in {root}: nothing registered.")
    return names
