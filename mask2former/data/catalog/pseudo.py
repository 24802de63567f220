"""Registration of pseudo-labeled splits (written by ``tools/pseudo_label.py``).

A pseudo-label split is a COCO json whose image entries name the original images (``file_name``
relative to the source image root, never copied) and a label PNG each (``sem_seg_file_name``
relative to the json's folder; 255 / the configured ignore value = not confident). The PNG is
the ground truth: only it carries the ignored pixels, so such a json must be registered here
(``DATASETS.PSEUDO_LABELS``), not as a plain COCO dataset.
"""

import functools
import os
from typing import List, Optional, Sequence

from PIL import Image

from ...utils.io import format_examples
from ..coco import build_category_mapping, read_coco_json
from .common import EVALUATOR_TYPE, default_palette, register_dataset
from .trash import TRASH_CLASSES, TRASH_COLORS

__all__ = [
    "load_pseudo_label_records",
    "register_pseudo_label_dataset",
    "register_pseudo_labels_from_cfg",
]


def load_pseudo_label_records(json_file: str, image_root: str) -> List[dict]:
    """Records of a pseudo-label json: ``file_name`` (in ``image_root``), ``sem_seg_file_name``
    (relative to the json's folder), ``height``, ``width``, ``image_id``; no ``annotations``
    (the label PNG, with its ignored pixels, is the ground truth).

    Raises:
        ValueError: naming the json and examples, for images without ``sem_seg_file_name``,
            missing image or label files, or label sizes differing from the json.
    """
    data = read_coco_json(json_file)
    json_dir = os.path.dirname(os.path.abspath(json_file))
    records, problems = [], []
    for img in data["images"]:
        if "sem_seg_file_name" not in img:
            problems.append(f"{img.get('file_name')}: no sem_seg_file_name")
            continue
        file_name = os.path.join(image_root, img["file_name"])
        label_file = os.path.join(json_dir, img["sem_seg_file_name"])
        if not os.path.isfile(file_name):
            problems.append(f"{img['file_name']}: no image {file_name}")
        if not os.path.isfile(label_file):
            problems.append(f"{img['file_name']}: no label file {label_file}")
            continue
        with Image.open(label_file) as lab:
            if lab.size != (img["width"], img["height"]) or lab.mode != "L":
                problems.append(
                    f"{label_file}: {lab.mode} label of size {lab.size}, expected a single-channel "
                    f"label of size {(img['width'], img['height'])}"
                )
                continue
        records.append(
            {
                "file_name": file_name,
                "sem_seg_file_name": label_file,
                "height": img["height"],
                "width": img["width"],
                "image_id": img["id"],
            }
        )
    if problems:
        raise ValueError(
            f"{json_file}: {len(problems)} problem(s): {format_examples(problems, sort=False)}"
        )
    if not records:
        raise ValueError(f"{json_file}: no images")
    return records


def register_pseudo_label_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    class_names: Optional[Sequence[str]] = None,
    class_colors: Optional[Sequence[Sequence[int]]] = None,
    ignore_label: int = 255,
):
    """Register a pseudo-labeled split written by :class:`PseudoLabelWriter` (idempotent).

    Args:
        name (str): dataset name, e.g. "trash_test_pseudo".
        json_file (str): the split's ``pseudo.json``.
        image_root (str): folder the images' ``file_name`` are relative to (the source json's).
        class_names: per label (default: the json's category names in id order, after
            "Background" unless the source's uncovered pixels were ignored).
        class_colors: per label (default: the trash palette for the trash classes, else
            :func:`~mask2former.data.catalog.common.default_palette`).
        ignore_label (int): must equal the ignore label the PNGs were written with.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: no pseudo-label json {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Dataset {name!r}: no image folder {image_root}")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    data = read_coco_json(json_file)
    written_ignore = data.get("pseudo_labels", {}).get("ignore_label")
    if written_ignore is None:
        raise ValueError(
            f"Dataset {name!r}: {json_file} is not a pseudo-label json (no 'pseudo_labels' entry)"
        )
    if written_ignore != ignore_label:
        raise ValueError(
            f"Dataset {name!r}: {json_file} was written with ignore label {written_ignore}, the "
            f"configuration ignores {ignore_label}"
        )
    # what label 0 of the source was (a Background class, or a category like any other)
    uncovered = data["pseudo_labels"].get("uncovered", "background")
    if class_names is None:
        class_names = build_category_mapping(
            data.get("categories", []), json_file, uncovered=uncovered
        ).class_names
    class_names = list(class_names)
    if class_colors is None:
        class_colors = (
            TRASH_COLORS
            if tuple(class_names) == TRASH_CLASSES
            else default_palette(len(class_names))
        )
    if len(class_colors) != len(class_names):
        raise ValueError(
            f"Dataset {name!r}: {len(class_names)} classes but {len(class_colors)} colours"
        )
    metadata = dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=EVALUATOR_TYPE,
        stuff_classes=class_names,
        stuff_colors=[tuple(c) for c in class_colors],
        ignore_label=ignore_label,
        has_ground_truth=True,
        uncovered=uncovered,
    )
    register_dataset(
        name, functools.partial(load_pseudo_label_records, json_file, image_root), metadata
    )


def register_pseudo_labels_from_cfg(cfg) -> List[str]:
    """Register every ``[name, pseudo_json, image_root]`` of ``cfg.DATASETS.PSEUDO_LABELS``
    (ignore label ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``). Returns the names."""
    names = []
    for entry in cfg.DATASETS.PSEUDO_LABELS:
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.PSEUDO_LABELS entries are [name, pseudo_json, image_root], got {entry}"
            )
        name, json_file, image_root = entry
        register_pseudo_label_dataset(
            name, json_file, image_root, ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        )
        names.append(name)
    return names
