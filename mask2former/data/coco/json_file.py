"""The one reader of COCO json files: parsed dict, or an error naming the file."""

import json
from collections import OrderedDict

__all__ = ["coco_image_names", "read_coco_json"]


def read_coco_json(json_file):
    """Parse ``json_file`` and check it is a COCO json (a dict with an ``"images"`` list).

    Raises:
        ValueError: naming the file, for invalid JSON or a json without an ``"images"`` list.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file}: not a COCO json (no 'images' list)")
    return data


def coco_image_names(json_file):
    """``OrderedDict`` COCO image id -> ``file_name`` exactly as written, in the json's order
    (the keys of submissions, probability dumps and label PNGs)."""
    images = read_coco_json(json_file)["images"]
    names = OrderedDict((image["id"], image["file_name"]) for image in images)
    if len(names) != len(images):
        raise ValueError(f"{json_file}: duplicate image ids")
    return names
