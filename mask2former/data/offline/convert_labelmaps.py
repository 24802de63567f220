"""Converting a folder of label-map PNGs into one COCO-polygon json (one annotation per
connected component per class, see :mod:`mask2former.data.masks.trace`)."""

import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...utils.io import write_json
from ..masks.trace import ConversionStats, label_map_to_annotations

__all__ = ["labelmaps_to_coco"]


def labelmaps_to_coco(
    label_dir,
    output_json,
    class_names,
    image_dir=None,
    image_ext=".jpg",
    ignore_label=255,
    background=0,
    min_area=0,
    small="drop",
    progress=False,
):
    """Convert every ``*.png`` label map of ``label_dir`` into one COCO json.

    Args:
        label_dir (str): folder of label PNGs.
        output_json (str): written atomically.
        class_names (list[str]): name per label value; categories are written for every label
            value except ``background`` and ``ignore_label`` (category id = label value).
            Without a background (``background=None``) the label values must be ``0..K-1``
            (``ignore_label`` outside them), so that registering the json with its recorded
            ``info.uncovered = "ignore"`` maps category id ``c`` back to label ``c``.
        image_dir (str or None): folder of the images; ``file_name`` is ``<stem><image_ext>``
            relative to it (default: the label file name).
        ignore_label, background, min_area, small: see :func:`label_map_to_annotations`;
            the json's ``info`` records ``uncovered``: ``"background"`` with ``background``
            (its pixels are what no annotation covers), ``"ignore"`` without one.
        progress (bool): show a progress bar.

    Returns:
        ConversionStats
    """
    if background is None and ignore_label < len(class_names):
        raise ValueError(
            f"ignore label {ignore_label} is one of the {len(class_names)} class values: without "
            "a background the classes must be the label values 0..K-1 and the ignore label "
            "another value"
        )
    files = sorted(f for f in os.listdir(label_dir) if f.lower().endswith(".png"))
    if not files:
        raise ValueError(f"No .png label maps in {label_dir}")
    stats = ConversionStats()
    images, annotations = [], []
    for image_id, name in enumerate(tqdm(files, desc="Label maps -> COCO", disable=not progress)):
        path = os.path.join(label_dir, name)
        label = np.asarray(Image.open(path))
        if label.ndim != 2:
            raise ValueError(f"{path}: label maps must be single-channel, got shape {label.shape}")
        too_big = [int(v) for v in np.unique(label) if v >= len(class_names) and v != ignore_label]
        if too_big:
            raise ValueError(
                f"{path}: label values {too_big} have no class name ({len(class_names)} classes)"
            )
        stem = os.path.splitext(name)[0]
        file_name = stem + image_ext if image_dir is not None else name
        if image_dir is not None and not os.path.isfile(os.path.join(image_dir, file_name)):
            raise FileNotFoundError(f"{path}: no image {os.path.join(image_dir, file_name)}")
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": label.shape[0],
                "width": label.shape[1],
            }
        )
        for ann in label_map_to_annotations(
            label, ignore_label, background, min_area, small, stats
        ):
            ann.update(id=len(annotations), image_id=image_id)
            annotations.append(ann)
    categories = [
        {"id": i, "name": n, "supercategory": n}
        for i, n in enumerate(class_names)
        if i != background and i != ignore_label
    ]
    info = {
        "description": f"label maps of {os.path.abspath(label_dir)}",
        # what pixels without an annotation are (read back by the dataset registration)
        "uncovered": "ignore" if background is None else "background",
    }
    data = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    write_json(output_json, data)
    return stats
