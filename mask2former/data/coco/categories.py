"""json category ids -> contiguous labels, for the two meanings of the pixels no annotation
covers (``UNCOVERED``): ``"background"`` (label 0 is a Background class, the categories get
1..K) or ``"ignore"`` (the categories get 0..K-1, uncovered pixels get the ignore label)."""

from dataclasses import dataclass
from typing import Dict, List, Tuple

from .json_file import read_coco_json

__all__ = [
    "UNCOVERED",
    "CategoryMapping",
    "build_category_mapping",
    "check_not_pseudo_labels",
    "check_uncovered",
    "coco_categories",
    "json_uncovered",
    "read_coco_categories",
]

# What the pixels no annotation covers are: a Background class (label 0) or ignored.
UNCOVERED = ("background", "ignore")


@dataclass
class CategoryMapping:
    """json category id -> contiguous label, and class names indexed by label."""

    category_id_to_label: Dict[int, int]
    class_names: List[str]
    background_ids: Tuple[int, ...] = ()


def _is_background_name(name):
    return str(name).strip().strip("_- ").lower() == "background"


def check_uncovered(uncovered, where):
    """Raise a ValueError naming ``where`` unless ``uncovered`` is one of :data:`UNCOVERED`."""
    if uncovered not in UNCOVERED:
        raise ValueError(f"{where}: uncovered must be one of {UNCOVERED}, got {uncovered!r}")


def build_category_mapping(
    categories, json_file, category_id_to_label=None, report=None, uncovered="background"
):
    """Map json categories to labels.

    Args:
        categories (list[dict]): the json's "categories".
        json_file (str): for error messages.
        category_id_to_label (dict or None): a fixed mapping (e.g. the trash classes); json
            categories outside it (other than background-named ones) are an error.
        report (ValidationReport or None): receives the background / remap lines.
        uncovered (str): ``"background"``: labels 1..K in id order, background-named categories
            -> 0, class names start with "Background"; ``"ignore"``: labels 0..K-1 in id order,
            every category (whatever its name) is a class, no Background class.
    """
    check_uncovered(uncovered, json_file)
    seen = {}
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(f"{json_file}: invalid category entry {cat!r} (needs int id and name)")
        if cat["id"] in seen:
            raise ValueError(f"{json_file}: category id {cat['id']} is defined twice")
        seen[cat["id"]] = str(cat["name"])
    if uncovered == "ignore":
        if category_id_to_label is not None:
            return CategoryMapping(dict(category_id_to_label), [], ())
        ids = sorted(seen)
        return CategoryMapping({cid: i for i, cid in enumerate(ids)}, [seen[c] for c in ids], ())
    background = tuple(cid for cid, name in seen.items() if _is_background_name(name))
    for cid in background:
        if report is not None:
            report.add("background_category", f"category {cid} {seen[cid]!r}", "-> label 0")
    real = sorted(cid for cid in seen if cid not in background)
    if category_id_to_label is not None:
        unexpected = [cid for cid in real if cid not in category_id_to_label]
        if unexpected:
            raise ValueError(
                f"{json_file}: categories {[(c, seen[c]) for c in unexpected]} are not among the "
                f"expected categories {sorted(category_id_to_label)}"
            )
        return CategoryMapping(dict(category_id_to_label), [], background)
    mapping = {cid: i + 1 for i, cid in enumerate(real)}
    for cid in background:
        mapping[cid] = 0
    if report is not None:
        for cid in real:
            if mapping[cid] != cid:
                report.add(
                    "category_remap", f"category {cid} {seen[cid]!r}", f"-> label {mapping[cid]}"
                )
    names = ["Background"] + [seen[cid] for cid in real]
    return CategoryMapping(mapping, names, background)


def read_coco_categories(json_file, category_id_to_label=None, uncovered="background"):
    """Category mapping and whether the json has ground truth, without validating the rest."""
    return coco_categories(read_coco_json(json_file), json_file, category_id_to_label, uncovered)


def json_uncovered(data, json_file):
    """What a json says its uncovered pixels are (``info.uncovered``, written by the label-map
    converter), or None when it does not say."""
    info = data.get("info")
    uncovered = info.get("uncovered") if isinstance(info, dict) else None
    if uncovered is not None:
        check_uncovered(uncovered, f"{json_file} (info.uncovered)")
    return uncovered


def check_not_pseudo_labels(data, json_file):
    """Refuse a pseudo-label json (``tools/pseudo_label.py``) where a plain COCO json is read."""
    if "pseudo_labels" in data:
        # its polygons leave out the ignored (not confident) pixels: read as a plain COCO json
        # they would silently become background
        raise ValueError(
            f"{json_file} is a pseudo-label split (tools/pseudo_label.py): register it with "
            "DATASETS.PSEUDO_LABELS, which reads its label PNGs with their ignored pixels"
        )


def coco_categories(data, json_file, category_id_to_label=None, uncovered="background"):
    """:func:`read_coco_categories` of an already parsed json ``data``."""
    check_not_pseudo_labels(data, json_file)
    mapping = build_category_mapping(
        data.get("categories", []), json_file, category_id_to_label, uncovered=uncovered
    )
    return mapping, bool(data.get("annotations"))
