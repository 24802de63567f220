"""Datasets: registration (:mod:`.catalog`), COCO json reading and validation (:mod:`.coco`),
label maps <-> polygons (:mod:`.masks`), training-time augmentation (:mod:`.augmentation`) and
offline tools (:mod:`.offline`, not imported here).

Importing the package only defines the registration functions; datasets are registered when
they are called (``register_datasets_from_cfg``).
"""

from .catalog import (
    TRASH_CLASSES,
    TRASH_COLORS,
    default_palette,
    register_coco_semseg,
    register_dataset,
    register_datasets_from_cfg,
    register_labelmap_semseg,
    register_pseudo_label_dataset,
    register_trash_dataset,
)

__all__ = [
    "TRASH_CLASSES",
    "TRASH_COLORS",
    "default_palette",
    "register_coco_semseg",
    "register_dataset",
    "register_datasets_from_cfg",
    "register_labelmap_semseg",
    "register_pseudo_label_dataset",
    "register_trash_dataset",
]
